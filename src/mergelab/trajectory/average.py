"""Average saved checkpoints of one run, streaming: memory does not grow with their number.

For each tensor, a float32 accumulator sums c_k * theta_k over the selected
checkpoints, read one at a time; the result is written like any merge
(sharded, atomic, config and tokenizer copied from the newest checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.writer import CheckpointWriter, TensorInfo
from mergelab.errors import ShapeMismatch
from mergelab.progress import ByteProgress
from mergelab.trajectory.discovery import RunCheckpoint


@dataclasses.dataclass
class AverageReport:
    out_dir: Path
    used: list[tuple[int, str, float]]  # (step, path, weight)
    skipped: list[tuple[int, str, str]]  # (step, path, why)
    tensors: int


def check_compatible(ckpts: Sequence[Checkpoint], labels: Sequence[str]) -> None:
    """Every checkpoint has the same tensor names and shapes as the newest one."""
    ref = ckpts[-1]
    for ck, label in zip(ckpts, labels):
        for name in ref.keys():
            if name not in ck:
                raise ShapeMismatch(f"checkpoint {label} has no tensor {name}, the newest checkpoint has")
            if ck.shape(name) != ref.shape(name):
                raise ShapeMismatch(f"checkpoint {label} tensor {name} has shape {tuple(ck.shape(name))}, "
                                    f"the newest checkpoint has {tuple(ref.shape(name))}")


def average_tensor(ckpts: Sequence[Checkpoint], weights: Sequence[float], name: str) -> torch.Tensor:
    """sum_k w_k theta_k[name] in float32, reading one checkpoint's tensor at a time."""
    acc = None
    for ck, w in zip(ckpts, weights):
        t = ck[name].to(torch.float32)
        if acc is None:
            acc = t.mul_(w)
        else:
            acc.add_(t, alpha=w)
    return acc


def nonfinite(ck: Checkpoint) -> str | None:
    """The first tensor holding NaN or Inf, or None."""
    for name in ck.keys():
        t = ck[name]
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def average_checkpoints(chosen: Sequence[RunCheckpoint], weights: Sequence[float], out_dir: str | Path, *,
                        shard_size: int = 5 * 10**9, overwrite: bool = False, show_progress: bool = True,
                        out_dtype: torch.dtype | None = None, extra_files: dict | None = None) -> AverageReport:
    """Write sum_k weights[k] * chosen[k] to out_dir. Non-float tensors come from the newest checkpoint."""
    if len(chosen) != len(weights):
        raise ValueError("one weight per checkpoint")
    ckpts = [Checkpoint(c.path) for c in chosen]
    labels = [str(c.path) for c in chosen]
    check_compatible(ckpts, labels)
    newest = ckpts[-1]
    names = list(newest.keys())
    layout = [TensorInfo(n, tuple(newest.shape(n)), (out_dtype if newest.dtype(n).is_floating_point else None)
                         or newest.dtype(n)) for n in names]
    total = sum(ck.total_bytes for ck in ckpts)
    protected = [Path(ck.folder or ck.path) for ck in ckpts]
    with CheckpointWriter(out_dir, layout, shard_size=shard_size, overwrite=overwrite, protected=protected) as w, \
            ByteProgress(len(names), total, enabled=show_progress, label="averaging") as progress:
        for info in layout:
            if newest.dtype(info.name).is_floating_point:
                out = average_tensor(ckpts, weights, info.name).to(info.dtype)
            else:
                out = newest[info.name]
            w.write(info.name, out)
            progress.advance(sum(ck.nbytes(info.name) for ck in ckpts))
        w.finish(assets_from=newest.folder, extra_files=extra_files)
    used = [(c.step, str(c.path), float(wt)) for c, wt in zip(chosen, weights)]
    return AverageReport(Path(out_dir), used, [], len(names))


def deviation_cosines(ckpts: Sequence[Checkpoint], *, max_elements: int = 2_000_000) -> torch.Tensor:
    """Pairwise cosine similarity of the checkpoints' deviations from their mean, (K, K).

    Computed over all floating tensors, streamed tensor by tensor; tensors are
    subsampled with a fixed stride so that at most `max_elements` per tensor
    enter the sums (the estimate stays unbiased for a large tensor).
    """
    k = len(ckpts)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for name in ckpts[-1].keys():
        if not ckpts[-1].dtype(name).is_floating_point:
            continue
        flat = [ck[name].reshape(-1) for ck in ckpts]
        stride = max(1, math.ceil(flat[0].numel() / max_elements))
        x = torch.stack([f[::stride].to(torch.float64) for f in flat])
        x -= x.mean(0, keepdim=True)
        gram += x @ x.T
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / norms[:, None] / norms[None, :]


def recommend(cos: torch.Tensor) -> str:
    """Plain-language advice from the deviation cosines (checkpoints oldest first).

    Deviations from the mean always sum to zero, so with K checkpoints of pure,
    independent oscillation around a basin every off-diagonal cosine is near
    -1/(K-1). A run still drifting along one direction shows instead a strong
    ordering: the oldest and newest deviations point in opposite directions
    (cosine near -1) while neighbours agree. The trend score is the cosine of
    the oldest with the newest deviation.
    """
    k = cos.shape[0]
    if k < 3:
        return "too few checkpoints to judge; plain averaging (sma) is the safe default"
    noise = -1.0 / (k - 1)
    trend = float(cos[0, -1])
    neighbours = float(torch.diagonal(cos, 1).mean())
    if trend < -0.5 and neighbours > 0.3:
        return (f"the checkpoints drift along one direction (oldest-vs-newest deviation cosine {trend:.2f}, "
                f"neighbours {neighbours:.2f}): a plain mean lags behind; prefer ema, wsm, or a short --last window")
    return (f"the checkpoints oscillate around one point (oldest-vs-newest deviation cosine {trend:.2f}, "
            f"independent noise would give {noise:.2f}): plain averaging (sma) over the window is enough")
