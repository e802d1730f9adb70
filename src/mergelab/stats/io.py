"""Stats checkpoints: statistics saved as safetensors, keyed like the model they describe.

A stats checkpoint is one .safetensors file. Its tensors carry the names of the
model's tensors (a diagonal Fisher or optimizer metric under each parameter's
name, a Gram matrix under its linear layer's weight name), so the engine can
read them lazily with `mergelab.checkpoint.Checkpoint`, exactly like weights.
Its header metadata says what the file holds:

    format = "mergelab-stats", version = "1",
    kind   = "fisher" | "gram" | "optimizer",
    count  = examples the statistics were averaged over (0 when not data-based),
    extra  = JSON object with anything else (e.g. Fisher estimator, optimizer kind).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import StatsError

FORMAT = "mergelab-stats"
VERSION = "1"
KINDS = ("fisher", "gram", "optimizer")


class StatsDict(dict):
    """name -> tensor, plus what `save_stats` needs: ``kind``, ``count`` and ``extra``.

    Returned by `diagonal_fisher`, `gram_matrices` and `extract_optimizer_metrics`,
    so `save_stats(path, stats)` needs no other argument.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] = (), *, kind: str, count: int = 0,
                 extra: Mapping[str, Any] | None = None):
        super().__init__(tensors)
        self.kind = kind
        self.count = int(count)
        self.extra = dict(extra or {})


def _check_kind(kind: str, where: str) -> None:
    if kind not in KINDS:
        raise StatsError(f"{where}: stats kind {kind!r} is not one of {', '.join(KINDS)}")


def save_stats(path: str | Path, tensors: Mapping[str, torch.Tensor], *, kind: str | None = None,
               count: int | None = None, extra: Mapping[str, Any] | None = None,
               inputs: Sequence[str | Path] = (), overwrite: bool = False) -> Path:
    """Write a stats checkpoint (float32 safetensors) atomically: a temporary file renamed into place.

    Args:
        path: the .safetensors file to write.
        tensors: name -> tensor, keyed like the model's tensors.
        kind: "fisher", "gram" or "optimizer"; defaults to ``tensors.kind`` for a StatsDict.
        count: examples the statistics average over; defaults to ``tensors.count`` (else 0).
        extra: JSON-serialisable details; merged over ``tensors.extra``.
        inputs: files and folders the statistics were computed from; the path may not be,
            or lie inside, any of them.
        overwrite: replace an existing file at `path` (refused otherwise).

    Returns:
        The path written.

    Raises:
        StatsError: unknown kind, no tensors, or a non-finite tensor (a NaN metric would
            poison every merge that reads it, so it is refused here already).
    """
    path = Path(path)
    kind = kind if kind is not None else getattr(tensors, "kind", None)
    if kind is None:
        raise StatsError(f"{path}: say which statistics these are: save_stats(..., kind='fisher'|'gram'|'optimizer')")
    _check_kind(kind, str(path))
    count = count if count is not None else getattr(tensors, "count", 0)
    details = {**getattr(tensors, "extra", {}), **(extra or {})}
    if not tensors:
        raise StatsError(f"{path}: no statistics to save (the dict is empty)")
    out = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise StatsError(f"{path}: statistics {name!r} has {bad} non-finite entries; recompute them "
                             "(in float32, with a smaller learning rate or more examples) before saving")
        out[name] = t
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "count": str(int(count)),
            "extra": json.dumps(details, sort_keys=True)}
    from mergelab.checkpoint.tensor_file import save_tensors_atomic

    save_tensors_atomic(path, out, meta, inputs=inputs, overwrite=overwrite, what="stats file")
    return path


def read_stats_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a stats checkpoint, from its header only: {"kind", "count", "extra"}.

    Raises:
        StatsError: the file is not a mergelab stats checkpoint.
    """
    from mergelab.checkpoint.safetensors_format import parse_header
    from mergelab.errors import CheckpointError

    path = Path(path)
    try:
        _, meta = parse_header(path)
    except (CheckpointError, OSError) as exc:
        raise StatsError(f"{path}: cannot read stats checkpoint: {exc}") from None
    if meta.get("format") != FORMAT:
        raise StatsError(f"{path} is not a mergelab stats checkpoint (no format={FORMAT!r} in its metadata); "
                         "write it with mergelab.stats.save_stats or `mergelab stats ...`")
    if meta.get("version") != VERSION:
        raise StatsError(f"{path}: stats format version {meta.get('version')!r}, this mergelab reads {VERSION!r}")
    kind = meta.get("kind", "")
    _check_kind(kind, str(path))
    try:
        count = int(meta.get("count", "0"))
        extra = json.loads(meta.get("extra", "{}"))
    except ValueError as exc:
        raise StatsError(f"{path}: damaged stats metadata ({exc}); recompute the statistics") from None
    return {"kind": kind, "count": count, "extra": extra}


def load_stats(path: str | Path) -> tuple[StatsDict, dict[str, Any]]:
    """Read a whole stats checkpoint into memory.

    Returns:
        (tensors, meta): a StatsDict name -> float32 tensor, and {"kind", "count", "extra"}.
        For streaming use `mergelab.checkpoint.Checkpoint(path)` and `read_stats_meta(path)`.
    """
    from mergelab.checkpoint.tensor_file import load_tensors

    meta = read_stats_meta(path)
    tensors = load_tensors(path)
    return StatsDict(tensors, kind=meta["kind"], count=meta["count"], extra=meta["extra"]), meta


def _expected_shape(kind: str, shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    if kind != "gram":
        return shape
    n_in = shape[0] if transposed else shape[-1]
    return (n_in, n_in)


def validate_stats(stats: Mapping[str, Any], shapes: Mapping[str, Any], *, kind: str,
                   source: str = "stats", transposed: Iterable[str] = ()) -> None:
    """Check statistics against a model before anything is merged; report every problem at once.

    A diagonal metric (fisher, optimizer) must exist for every floating tensor of the model and
    have its shape; a Gram matrix is optional per tensor (tensors without one are averaged) but
    must be (in, in) for a 2-D weight of shape (out, in), or (in, in) with in = shape[0] for a
    weight stored (in, out) (transformers' Conv1D: ``transposed``, or ``stats.extra["transposed"]``
    as gram_matrices records it). Names the model lacks are errors too: they usually mean the
    statistics belong to another model.

    Args:
        stats: name -> tensor (or anything with ``.shape``), e.g. a StatsDict or a Checkpoint.
        shapes: name -> shape (tuple, torch.Size, or a tensor) of the model's tensors to merge.
        kind: "fisher", "gram" or "optimizer".
        source: how to name the statistics in messages (their file name).
        transposed: weight names stored (in, out), besides those the stats record.

    Raises:
        StatsError: listing every missing, unexpected or misshapen entry.
    """
    _check_kind(kind, source)
    transposed = set(transposed) | set(getattr(stats, "extra", {}).get("transposed", []))

    def shape_of(v: Any) -> tuple[int, ...]:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    problems = []
    unknown = [n for n in stats if n not in shapes]
    if unknown:
        problems.append(f"{len(unknown)} entries name no tensor of the model, e.g. {unknown[:3]}")
    missing = [n for n in shapes if n not in stats]
    if missing and kind != "gram":
        problems.append(f"{len(missing)} model tensors have no {kind} statistics, e.g. {missing[:3]}")
    for name in shapes:
        if name not in stats:
            continue
        want = _expected_shape(kind, shape_of(shapes[name]), name in transposed)
        if kind == "gram" and len(shape_of(shapes[name])) != 2:
            problems.append(f"{name!r} is not a 2-D weight, so it cannot have a Gram matrix")
            continue
        # A Checkpoint answers shapes from its header; a dict holds the tensors themselves.
        got = tuple(stats.shape(name)) if callable(getattr(stats, "shape", None)) else shape_of(stats[name])
        if got != want:
            problems.append(f"{name!r} has shape {got}, the model's tensor needs {want}")
    if problems:
        raise StatsError(f"{source} does not fit the model ({len(problems)} problems): " + "; ".join(problems)
                         + ". Recompute the statistics on this model.")
