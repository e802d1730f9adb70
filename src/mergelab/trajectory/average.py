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
from mergelab.errors import InvalidInput, NonFiniteError, ShapeMismatch
from mergelab.methods.kernels import has_nonfinite
from mergelab.progress import ByteProgress
from mergelab.trajectory.discovery import RunCheckpoint


@dataclasses.dataclass
class AverageReport:
    out_dir: Path
    used: list[tuple[int, str, float]]  # (step, path, weight)
    skipped: list[tuple[int, str, str]]  # (step, path, why)
    tensors: int
    partial: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # tensor -> checkpoints it came from
    correlation: dict | None = None  # deviation cosines and the advice drawn from them (same pass as the average)


def tensor_sources(ckpts: Sequence[Checkpoint], labels: Sequence[str], *,
                   allow_missing: bool = False) -> dict[str, list[int]]:
    """Which checkpoints each tensor is averaged over, after checking they agree.

    Every checkpoint must hold the same tensor names with the same shapes.
    With `allow_missing`, a tensor that only some checkpoints hold is averaged
    over those (the caller reports it); shapes must still agree.

    Raises:
        ShapeMismatch: naming the tensor and the checkpoints that differ.
    """
    names: dict[str, list[int]] = {}
    for k, ck in enumerate(ckpts):
        for name in ck.keys():
            names.setdefault(name, []).append(k)
    missing = {n: ks for n, ks in names.items() if len(ks) != len(ckpts)}
    if missing and not allow_missing:
        lines = []
        for n, ks in list(missing.items())[:5]:
            absent = [labels[k] for k in range(len(ckpts)) if k not in ks]
            lines.append(f"{n} is missing from {', '.join(absent[:3])}" + (" ..." if len(absent) > 3 else ""))
        more = f" (and {len(missing) - 5} more tensors)" if len(missing) > 5 else ""
        raise ShapeMismatch("the checkpoints do not hold the same tensors: " + "; ".join(lines) + more
                            + ". Leave out the odd checkpoints, or average each tensor over the checkpoints "
                            "that hold it (allow_missing_tensors=True; --allow-missing-tensors)")
    for name, ks in names.items():
        ref = ckpts[ks[-1]]
        for k in ks:
            if ckpts[k].shape(name) != ref.shape(name):
                raise ShapeMismatch(f"checkpoint {labels[k]} tensor {name} has shape {tuple(ckpts[k].shape(name))}, "
                                    f"checkpoint {labels[ks[-1]]} has {tuple(ref.shape(name))}")
    return names


def average_tensor(tensors: Sequence[torch.Tensor], weights: Sequence[float], name: str,
                   labels: Sequence[str]) -> torch.Tensor:
    """sum_k w_k tensors[k] in float32 (tensors: one checkpoint's `name` each, as stored).

    Raises:
        NonFiniteError: a checkpoint's tensor holds NaN/Inf (named), so the average would too.
    """
    acc = None
    for t, w in zip(tensors, weights):
        if acc is None:
            acc = t.to(torch.float32, copy=True).mul_(w)
        else:
            acc.add_(t, alpha=w)
    if acc is not None and has_nonfinite(acc):
        for t, label in zip(tensors, labels):
            if has_nonfinite(t):
                raise NonFiniteError(f"checkpoint {label} tensor {name} holds NaN or Inf values, so the average "
                                     "would too; nothing was written. Leave out unstable checkpoints "
                                     "(skip_unstable=True; --skip-unstable) or choose the checkpoints yourself")
    return acc


def nonfinite(ck: Checkpoint) -> str | None:
    """The first tensor holding NaN or Inf, or None."""
    for name in ck.keys():
        if has_nonfinite(ck.view(name)):
            return name
    return None


def average_checkpoints(chosen: Sequence[RunCheckpoint], weights: Sequence[float], out_dir: str | Path, *,
                        shard_size: int = 5 * 10**9, overwrite: bool = False, show_progress: bool = True,
                        out_dtype: torch.dtype | None = None, extra_files: dict | None = None,
                        extra_files_fn=None, copy_files: dict | None = None,
                        allow_missing_tensors: bool = False) -> AverageReport:
    """Write sum_k weights[k] * chosen[k] to out_dir. Non-float tensors come from the newest checkpoint.

    A tensor held by only some checkpoints (allowed with `allow_missing_tensors`)
    is averaged over those, with their weights renormalised to sum to one; the
    report lists it with the checkpoints it came from. `extra_files_fn(report)`
    returns files written beside the weights (after the report is known);
    `copy_files` are copied into the output before it is moved into place.
    """
    if len(chosen) != len(weights):
        raise InvalidInput("one weight per checkpoint")
    ckpts = [Checkpoint(c.path) for c in chosen]
    labels = [str(c.path) for c in chosen]
    sources = tensor_sources(ckpts, labels, allow_missing=allow_missing_tensors)
    newest = ckpts[-1]
    names = list(newest.keys()) + [n for n in sources if n not in newest]
    holder = {n: ckpts[sources[n][-1]] for n in names}
    layout = [TensorInfo(n, tuple(holder[n].shape(n)), (out_dtype if holder[n].dtype(n).is_floating_point else None)
                         or holder[n].dtype(n)) for n in names]
    total = sum(ck.total_bytes for ck in ckpts)
    protected = [Path(ck.folder or ck.path) for ck in ckpts]
    partial = {n: [labels[k] for k in ks] for n, ks in sources.items() if len(ks) != len(ckpts)}
    used = [(c.step, str(c.path), float(wt)) for c, wt in zip(chosen, weights)]
    report = AverageReport(Path(out_dir), used, [], len(names), partial)
    deviations = DeviationGram(len(ckpts))
    with CheckpointWriter(out_dir, layout, shard_size=shard_size, overwrite=overwrite, protected=protected) as w, \
            ByteProgress(len(names), total, enabled=show_progress, label="averaging") as progress:
        for info in layout:
            ks = sources[info.name]
            if holder[info.name].dtype(info.name).is_floating_point:
                ws = [weights[k] for k in ks]
                scale = sum(ws)
                tensors = [ckpts[k].view(info.name) for k in ks]  # read once: the average and the cosines
                out = average_tensor(tensors, [x / scale for x in ws], info.name,
                                     [labels[k] for k in ks]).to(info.dtype)
                if len(ks) == len(ckpts):
                    deviations.add(tensors)
                del tensors
            else:
                out = holder[info.name][info.name]
            w.write(info.name, out)
            progress.advance(sum(ckpts[k].nbytes(info.name) for k in ks))
        cos = deviations.cosines()
        report.correlation = {"steps": [c.step for c in chosen],
                              "deviation_cosine": cos.tolist() if bool(cos.isfinite().all()) else None,
                              "recommendation": recommend(cos)}
        files = dict(extra_files or {})
        if extra_files_fn is not None:
            files.update(extra_files_fn(report))
        w.finish(assets_from=newest.folder, extra_files=files, copy_files=copy_files)
    return report


class DeviationGram:
    """Pairwise inner products of K checkpoints' deviations from their mean, accumulated tensor by tensor.

    Each tensor enters through a fixed stride that keeps at most `max_elements`
    entries (an unbiased estimate for a big tensor), so the sums cost little
    beside the average they are computed with, from the same reads.
    """

    def __init__(self, k: int, *, max_elements: int = 2_000_000):
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.max_elements = max_elements

    def add(self, tensors: Sequence[torch.Tensor]) -> None:
        flat = [t.reshape(-1) for t in tensors]
        stride = max(1, math.ceil(flat[0].numel() / self.max_elements))
        x = torch.stack([f[::stride].to(torch.float64) for f in flat])
        x -= x.mean(0, keepdim=True)
        self.gram += x @ x.T

    def cosines(self) -> torch.Tensor:
        norms = self.gram.diagonal().clamp_min(1e-30).sqrt()
        return self.gram / norms[:, None] / norms[None, :]


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
    if not bool(torch.isfinite(cos).all()):
        return ("no advice: some checkpoints hold NaN or Inf values (leave them out with --skip-unstable)")
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
