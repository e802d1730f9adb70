"""Average saved checkpoints of one run: a plan of weighted sums, run by the engine.

The average sum_k c_k theta_k is a linear merge whose weights come from a
schedule (schedules.py). average_plan() turns the chosen checkpoints and
their weights into one engine Job per tensor (the `linear` method, weights
normalised per tensor), and engine.execute() runs it like any merge:
prefetching, chunking, the compiled kernel, the report, the atomic writer.

What the run's report needs besides the sum (the deviation cosines, and
which checkpoints hold NaN/Inf) is gathered by PassObserver from the very
tensors the engine reads for the sum, through execute's `observe` hook: every
checkpoint is read once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from mergelab.checkpoint.reader import Checkpoint
from mergelab.errors import InvalidInput, NonFiniteError, ShapeMismatch
from mergelab.methods import get_method
from mergelab.methods.linear import LinearModel, LinearShared
from mergelab.plan import Job, OutputSpec, Plan, TensorRef
from mergelab.trajectory.discovery import RunCheckpoint


@dataclasses.dataclass
class AverageReport:
    out_dir: Path
    used: list[tuple[int, str, float]]  # (step, path, weight)
    skipped: list[tuple[int, str, str]]  # (step, path, why)
    tensors: int
    partial: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # tensor -> checkpoints it came from
    correlation: dict | None = None  # deviation cosines and the advice drawn from them (same pass as the average)
    bytes_read: int = 0  # input bytes the pass read (every chosen checkpoint once)
    bytes_reread: int = 0  # read by passes stopped at a NaN/Inf checkpoint (skip_unstable), then read again
    seconds: float = 0.0
    copied_files: list[str] = dataclasses.field(default_factory=list)  # e.g. optimizer state, for resuming


class UnstableCheckpoint(NonFiniteError):
    """A chosen checkpoint holds NaN/Inf; raised from inside the pass, so nothing is written."""

    def __init__(self, index: int, label: str, tensor: str):
        super().__init__(f"checkpoint {label} tensor {tensor} holds NaN or Inf values, so the average would too; "
                         "nothing was written. Leave out unstable checkpoints (skip_unstable=True) "
                         "or choose the checkpoints yourself", option="skip_unstable")
        self.index, self.label, self.tensor = index, label, tensor
        self.bytes_read = 0  # what the stopped pass had read (set by PassObserver)


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
                            "that hold it (allow_missing_tensors=True)", option="allow_missing_tensors")
    for name, ks in names.items():
        ref = ckpts[ks[-1]]
        for k in ks:
            if ckpts[k].shape(name) != ref.shape(name):
                raise ShapeMismatch(f"checkpoint {labels[k]} tensor {name} has shape {tuple(ckpts[k].shape(name))}, "
                                    f"checkpoint {labels[ks[-1]]} has {tuple(ref.shape(name))}")
    return names


def average_plan(ckpts: Sequence[Checkpoint], weights: Sequence[float], labels: Sequence[str], *,
                 out_dtype: torch.dtype | None = None, allow_missing: bool = False) -> Plan:
    """One job per tensor: the `linear` method over the checkpoints holding it, with their weights.

    The output holds the newest checkpoint's tensors in its order, then those
    only older ones hold (allow_missing). Float tensors are sum_k c_k theta_k / sum_k c_k
    over the checkpoints holding them (the weights sum to one, so for a tensor every
    checkpoint holds this is the schedule's average); non-float ones are copied
    from the newest checkpoint holding them. Nothing is read here.
    """
    if len(ckpts) != len(weights):
        raise InvalidInput("one weight per checkpoint")
    sources = tensor_sources(ckpts, labels, allow_missing=allow_missing)
    names = list(ckpts[-1].keys()) + [n for n in sources if n not in ckpts[-1]]
    shared = LinearShared(normalize=True)
    jobs = []
    for name in names:
        ks = sources[name]
        holder = ckpts[ks[-1]]
        shape, dtype = tuple(holder.shape(name)), holder.dtype(name)
        if not dtype.is_floating_point:
            jobs.append(Job(name=name, shape=shape, dtype=dtype, inputs=(TensorRef(ks[-1], name),), op="copy"))
            continue
        if sum(weights[k] for k in ks) <= 0:
            raise InvalidInput(f"tensor {name} is held only by checkpoints of weight 0 ({labels[ks[0]]} ...), so "
                               "it has no average; choose a window or scheme that gives them weight")
        jobs.append(Job(name=name, shape=shape, dtype=out_dtype or dtype,
                        inputs=tuple(TensorRef(k, name) for k in ks),
                        model_params=tuple(LinearModel(weight=weights[k]) for k in ks), shared=shared))
    return Plan(get_method("linear"), list(ckpts), jobs, output=OutputSpec(assets_from=ckpts[-1]))


class DeviationGram:
    """Pairwise inner products of K checkpoints' deviations from their mean, accumulated tensor by tensor.

    Each tensor enters through a fixed stride that keeps at most `max_elements`
    entries (an unbiased estimate for a big tensor), so the sums cost little
    beside the average they are computed with, from the same reads. A tensor
    may arrive in row chunks: `start` and `total` (its element offset and
    size) keep the sampled positions those of the whole tensor.
    """

    def __init__(self, k: int, *, max_elements: int = 2_000_000):
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.max_elements = max_elements

    def add(self, tensors: Sequence[torch.Tensor], *, start: int = 0, total: int | None = None) -> None:
        flat = [t.reshape(-1) for t in tensors]
        stride = max(1, math.ceil((total or flat[0].numel()) / self.max_elements))
        first = -start % stride  # the first position of this chunk on the whole tensor's grid
        kernel = _gram_kernel()
        if kernel is not None and kernel.supports(flat):
            self.gram += kernel.gram(flat, first, stride)  # one compiled pass, no float64 copies
            return
        samples = flat[0][first::stride].numel()
        x = torch.empty(len(flat), samples, dtype=torch.float64)  # (K, samples)
        for row, f in zip(x, flat):
            row.copy_(f[first::stride])
        x -= x.mean(0, keepdim=True)
        self.gram += x @ x.T

    def cosines(self) -> torch.Tensor:
        norms = self.gram.diagonal().clamp_min(1e-30).sqrt()
        return self.gram / norms[:, None] / norms[None, :]


def _gram_kernel():
    """methods/kernels/trajectory_gram.py when kernels are on and numba imports, else None (the torch path runs)."""
    from mergelab.methods.kernels import compiled_module, kernels_enabled

    return compiled_module("trajectory_gram") if kernels_enabled() else None


class PassObserver:
    """engine.execute's `observe` hook for an average: the cosines and the NaN/Inf check, same reads.

    Raises UnstableCheckpoint at the first input holding NaN/Inf, which stops
    the engine before anything is written.
    """

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.gram = DeviationGram(len(labels))
        self.bytes_read = 0

    def __call__(self, job: Job, rows: tuple[int, int] | None, tensors: dict, nonfinite: list) -> None:
        self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
        if job.copy:
            return
        xs = [tensors[r] for r in job.inputs]
        for ref in job.inputs:
            if ref in nonfinite:  # the engine's own NaN/Inf check of these inputs
                exc = UnstableCheckpoint(ref.model, self.labels[ref.model], job.name)
                exc.bytes_read = self.bytes_read
                raise exc
        if len(xs) == len(self.labels):  # tensors every checkpoint holds
            row = math.prod(job.shape[1:]) if job.shape else 1
            self.gram.add(xs, start=0 if rows is None else rows[0] * row, total=math.prod(job.shape))

    def correlation(self, steps: Sequence[int]) -> dict:
        cos = self.gram.cosines()
        return {"steps": list(steps), "deviation_cosine": cos.tolist() if bool(cos.isfinite().all()) else None,
                "recommendation": recommend(cos)}


def average_checkpoints(chosen: Sequence[RunCheckpoint], weights: Sequence[float], out_dir: str | Path, *,
                        shard_size: int = 5 * 10**9, overwrite: bool = False, show_progress: bool = True,
                        out_dtype: torch.dtype | None = None, extra_files: dict | None = None,
                        extra_files_fn=None, copy_files: dict | None = None,
                        allow_missing_tensors: bool = False) -> AverageReport:
    """Write sum_k weights[k] * chosen[k] to out_dir, reading each checkpoint once.

    Non-float tensors come from the newest checkpoint. A tensor held by only
    some checkpoints (allowed with `allow_missing_tensors`) is averaged over
    those, with their weights renormalised to sum to one; the report lists it
    with the checkpoints it came from. `extra_files_fn(report)` returns files
    written beside the weights (after the report is known); `copy_files` are
    copied into the output before it is moved into place.

    Raises:
        UnstableCheckpoint: a chosen checkpoint holds NaN/Inf (nothing written).
    """
    from mergelab.engine import execute

    labels = [str(c.path) for c in chosen]
    ckpts = [Checkpoint(c.path) for c in chosen]
    try:
        plan = average_plan(ckpts, weights, labels, out_dtype=out_dtype, allow_missing=allow_missing_tensors)
        partial = {j.name: [labels[r.model] for r in j.inputs] for j in plan.jobs
                   if not j.copy and len(j.inputs) != len(ckpts)}
        used = [(c.step, str(c.path), float(wt)) for c, wt in zip(chosen, weights)]
        report = AverageReport(Path(out_dir), used, [], len(plan.jobs), partial, copied_files=list(copy_files or {}))
        observer = PassObserver(labels)

        def files(run) -> dict:
            report.correlation = observer.correlation([c.step for c in chosen])
            report.bytes_read = run.bytes_read
            out = dict(extra_files or {})
            if extra_files_fn is not None:
                out.update(extra_files_fn(report))
            return out

        run = execute(plan, out_dir, shard_size=shard_size, overwrite=overwrite, show_progress=show_progress,
                      extra_files_fn=files, copy_files=copy_files, observe=observer)
        report.seconds = run.seconds
        return report
    finally:
        for ck in ckpts:
            ck.close()


def average_state_dict(chosen: Sequence[RunCheckpoint], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_k weights[k] * chosen[k] in memory (the numbers average_checkpoints writes), e.g. to evaluate it."""
    from mergelab.engine import execute_into

    labels = [str(c.path) for c in chosen]
    ckpts = [Checkpoint(c.path) for c in chosen]
    try:
        plan = average_plan(ckpts, weights, labels)
        out = {j.name: torch.empty(j.shape, dtype=j.dtype) for j in plan.jobs}
        execute_into(plan, out)
        return out
    finally:
        for ck in ckpts:
            ck.close()


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
        return ("no advice: some checkpoints hold NaN or Inf values (leave them out with skip_unstable=True)")
    if k < 3:
        return "too few checkpoints to judge; plain averaging (sma) is the safe default"
    noise = -1.0 / (k - 1)
    trend = float(cos[0, -1])
    neighbours = float(torch.diagonal(cos, 1).mean())
    if trend < -0.5 and neighbours > 0.3:
        return (f"the checkpoints drift along one direction (oldest-vs-newest deviation cosine {trend:.2f}, "
                f"neighbours {neighbours:.2f}): a plain mean lags behind; prefer ema, wsm, or a short last= window")
    return (f"the checkpoints oscillate around one point (oldest-vs-newest deviation cosine {trend:.2f}, "
            f"independent noise would give {noise:.2f}): plain averaging (sma) over the window is enough")
