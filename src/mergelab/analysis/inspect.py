"""`inspect`: data-free diagnostics of models about to be merged, streamed tensor by tensor.

`inspect_models` reads the N models (and the base, if any) one tensor name at a
time, computes the task-vector geometry of that tensor and adds it to the sums
of its layer, of its kind (attention, mlp, embedding, norm, other) and of the
whole model. Per tensor: a sampled magnitude profile (the trim threshold), one
compiled pass over the tensors as stored for every sum (methods/kernels/geometry.py;
the torch reference in analysis/geometry.py where numba is missing or kernels are
off), and, on a sample of layers, a randomized SVD of an evenly spaced sub-grid for
the spectral overlap, run beside the pass on a worker thread.

Checkpoints stream through the engine as an observe-only plan (engine.run with one
observe job per name): memory-map views whose pages the prefetch thread maps in one
name ahead, checked unchanged after use and released, so memory never holds a whole
model; in-memory state dicts are read name by name. `recommend` turns the report into merge-method suggestions with their
reasons; `mergelab.cli.tables.render_inspect` draws it as rich tables.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.analysis.geometry import (
    EXACT_TOPK_MAX_NUMEL,
    MASS_DENSITIES,
    SPECTRAL_MAX_DIM,
    GeometrySums,
    even_indices,
    magnitude_profile,
    profile_from_magnitudes,
    sample_index,
    spectral_overlap,
    tensor_geometry,
)
from mergelab.analysis.group_stats import KINDS, GroupStats, tensor_kind
from mergelab.checkpoint.reader import Checkpoint, layer_index
from mergelab.engine import Sink, run
from mergelab.errors import MergeError, NonFiniteError, ShapeMismatch
from mergelab.methods.kernels import compiled_module, has_nonfinite, kernels_enabled
from mergelab.plan import Job, Plan, TensorRef
from mergelab.progress import ByteProgress

SPECTRAL_LAYERS = 8
"""Layers (evenly spaced) whose 2-D tensors get a spectral overlap by default: the SVDs cost more
than every other statistic together, and the overlap varies slowly with depth."""

@dataclasses.dataclass
class InspectReport:
    """What `inspect_models` found; `to_dict()` is JSON-ready."""

    models: list[str]
    base: str | None
    reference: str  # "base": task vectors from the base; "mean": deviations from the models' mean
    density: float
    spectral_layers: int | None  # layers sampled for spectral overlap (None: all)
    groups: list[GroupStats]  # layers in index order, then each non-layer tensor on its own
    kinds: dict[str, GroupStats]  # attention / mlp / embedding / norm / other, those present
    overall: GroupStats
    skipped: list[dict[str, str]]  # {"tensor": name, "reason": why it was not analysed}

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": self.models, "base": self.base, "reference": self.reference, "density": self.density,
            "spectral_layers": self.spectral_layers, "overall": self.overall.to_dict(),
            "kinds": {k: g.to_dict() for k, g in self.kinds.items()},
            "groups": [g.to_dict() for g in self.groups],
            "skipped": self.skipped,
        }


def _open(model: str | Path | Mapping[str, torch.Tensor], label: str,
          opened: contextlib.ExitStack) -> tuple[str, Mapping[str, torch.Tensor]]:
    """(label, mapping): a path opens as a lazy Checkpoint (closed with `opened`); a mapping is used as is."""
    if isinstance(model, Checkpoint):
        return str(model.path), model
    if isinstance(model, Mapping):
        return label, model
    return str(model), opened.enter_context(Checkpoint(model))


def _shape(mapping: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return tuple(mapping.shape(name)) if isinstance(mapping, Checkpoint) else tuple(mapping[name].shape)


def _is_float(mapping: Mapping[str, torch.Tensor], name: str) -> bool:
    dtype = mapping.dtype(name) if isinstance(mapping, Checkpoint) else mapping[name].dtype
    return dtype.is_floating_point


def _plan(sources: list[tuple[str, Mapping]]) -> tuple[list[str], list[dict[str, str]]]:
    """Names to analyse (those every input holds, floating point) and the rest with reasons; checks shapes."""
    first_label, first = sources[0]
    skipped = []
    for label, mapping in sources[1:]:
        skipped += [{"tensor": n, "reason": f"absent from {first_label}"} for n in mapping if n not in first]
    names, mismatches = [], []
    for name in first:
        absent = [label for label, m in sources[1:] if name not in m]
        if absent:
            skipped.append({"tensor": name, "reason": f"absent from {', '.join(absent)}"})
            continue
        want = _shape(first, name)
        mismatches += [f"{label} tensor {name} has shape {_shape(m, name)}, {first_label} has {want}"
                       for label, m in sources[1:] if _shape(m, name) != want]
        if not all(_is_float(m, name) for _, m in sources):
            skipped.append({"tensor": name, "reason": "not floating point (an integer buffer)"})
        else:
            names.append(name)
    if mismatches:
        more = f" (and {len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
        raise ShapeMismatch("; ".join(mismatches[:3]) + more + ". inspect compares models of one architecture: "
                            "pass fine-tunes of the same model (and its base).")
    return names, skipped


def _group_of(name: str) -> tuple[int, int | str]:
    """Sort key and identity of a tensor's group: (0, block index) for layers, (1, name) otherwise."""
    index = layer_index(name)
    return (1, name) if index is None else (0, index)


def _nbytes(mapping: Mapping, name: str) -> int:
    if isinstance(mapping, Checkpoint):
        return mapping.nbytes(name)
    t = mapping[name]
    return t.numel() * t.element_size()


@functools.lru_cache(maxsize=None)
def _compiled() -> Any:
    """methods/kernels/geometry.py, or None where numba is missing (then the torch reference runs)."""
    return compiled_module("geometry")


def _spectral_sample(names: list[str], layers: int | None) -> set[str]:
    """The 2-D-or-not tensor names whose spectral overlap is computed: every non-layer tensor, and those of
    `layers` evenly spaced layer indices (all layers when None)."""
    indices = sorted({i for i in map(layer_index, names) if i is not None})
    if layers is not None and len(indices) > layers:
        picks = {indices[round(k * (len(indices) - 1) / max(layers - 1, 1))] for k in range(layers)} if layers else set()
    else:
        picks = set(indices)
    return {n for n in names if layer_index(n) is None or layer_index(n) in picks}


def _subgrid(t: torch.Tensor) -> torch.Tensor:
    """float32 copy of the evenly spaced SPECTRAL_MAX_DIM sub-grid that spectral_overlap compares."""
    rows, cols = t.shape
    return t[even_indices(rows, SPECTRAL_MAX_DIM)][:, even_indices(cols, SPECTRAL_MAX_DIM)].float()


def _reference_sums(weights: list[torch.Tensor], reference: torch.Tensor | None, density: float,
                    spectral: bool) -> GeometrySums:
    """tensor_geometry on float32 copies: the readable path, where numba is missing or kernels are off."""
    profile = magnitude_profile(weights, reference, density)
    stacked = torch.stack([w.float() for w in weights])  # (N, *shape)
    ref = reference.float() if reference is not None else stacked.mean(dim=0)
    sums = tensor_geometry(stacked, ref, density, spectral=False, profile=profile)
    if spectral and _finite(sums):  # NaN/Inf: the caller reports it, no SVD to fail on
        grids = torch.stack([_subgrid(w) for w in weights])  # (N, <= SPECTRAL_MAX_DIM, <= SPECTRAL_MAX_DIM)
        ref_grid = _subgrid(reference) if reference is not None else grids.mean(dim=0)
        sums.set_overlap(*spectral_overlap(grids - ref_grid))
    return sums


def _spectral_task(kernel: Any, weights: list[torch.Tensor], reference: torch.Tensor | None) -> Any:
    """spectral_overlap of the sub-grid task matrices, gathered from the stored tensors; None if not finite."""
    rows, cols = weights[0].shape
    sub = kernel.subgrid_deltas(weights, reference, even_indices(rows, SPECTRAL_MAX_DIM).numpy(),
                                even_indices(cols, SPECTRAL_MAX_DIM).numpy())  # (N, <= 512, <= 512) float32
    return spectral_overlap(torch.from_numpy(sub)) if np.isfinite(sub).all() else None


def _compiled_sums(kernel: Any, weights: list[torch.Tensor], reference: torch.Tensor | None, density: float,
                   spectral: bool, pool: Executor | None) -> GeometrySums:
    """The same sums from the tensors as stored: a sampled profile, one compiled pass (its blocks on `pool`),
    the spectral overlap of 2-D tensors alongside it."""
    numel = weights[0].numel()
    index = sample_index(numel) if numel > EXACT_TOPK_MAX_NUMEL else np.arange(numel)
    profile = profile_from_magnitudes(kernel.sample_magnitudes(weights, reference, index), density)
    overlap = None
    if spectral and pool is not None:  # started first: it runs beside the pass's blocks
        overlap = pool.submit(_spectral_task, kernel, weights, reference)
    found = kernel.geometry_pass(weights, reference, profile.threshold, pool)
    sums = GeometrySums(len(weights), n_tensors=1, n_params=numel, ref_sq=found["ref_sq"],
                        conflicts=found["conflicts"], trimmed=found["trimmed"])
    sums.weight_gram = torch.from_numpy(found["weight_gram"])
    sums.task_gram = torch.from_numpy(found["task_gram"])
    sums.mass_total = torch.from_numpy(found["mass_total"])
    sums.mass_kept = {d: profile.mass_share[:, c] * sums.mass_total for c, d in enumerate(MASS_DENSITIES)}
    if spectral:
        found_overlap = overlap.result() if overlap is not None else _spectral_task(kernel, weights, reference)
        if found_overlap is not None and _finite(sums):
            sums.set_overlap(*found_overlap)
    return sums


def _finite(sums: GeometrySums) -> bool:
    return bool(torch.isfinite(sums.weight_gram.diagonal()).all()) and math.isfinite(sums.ref_sq)


def tensor_sums(weights: list[torch.Tensor], reference: torch.Tensor | None, density: float, *,
                spectral: bool, pool: Executor | None = None) -> GeometrySums:
    """The geometry sums of one tensor name from the tensors as stored: the compiled kernels where numba is
    there and kernels are on (their work spread over `pool`'s threads), else the torch reference
    (tensor_geometry); the same numbers either way (tests/analysis/test_inspect_fast.py)."""
    spectral = spectral and weights[0].dim() == 2
    kernel = _compiled() if kernels_enabled() else None
    if kernel is None:
        return _reference_sums(weights, reference, density, spectral)
    return _compiled_sums(kernel, weights, reference, density, spectral, pool)


def _check_finite(labels: list[str], name: str, sums: GeometrySums,
                  weights: list[torch.Tensor], reference: torch.Tensor | None) -> None:
    """NaN or Inf in an input shows in its float64 sum of squares (finite float32 squares cannot overflow it)."""
    if _finite(sums):
        return
    where = [label for label, w in zip(labels, weights) if has_nonfinite(w)]
    if reference is not None and has_nonfinite(reference):
        where.append("the base")
    raise NonFiniteError(f"tensor {name} of {', '.join(where) or 'an input'} holds NaN or Inf values; "
                         "no geometry can be measured on it; repair or leave out that model")


SMALL_NUMEL = 1 << 20
"""Names with fewer entries than this are computed whole on one worker thread each, several at once;
bigger ones have their compiled pass cut into blocks for the workers (methods/kernels/geometry.py's BLOCK)."""


class _Sums:
    """Geometry sums per group, per kind and overall, added in name order whatever finished first.

    `add(name, tensors)` starts a name's sums: a small name whole on one worker of `pool`, a big one
    with its blocks spread over the workers; finished names are added as soon as every earlier one is.
    """

    def __init__(self, labels: list[str], has_base: bool, density: float, spectral_names: set[str],
                 progress: ByteProgress | None, pool: Executor | None):
        self.labels, self.n, self.has_base = labels, len(labels), has_base
        self.density, self.spectral_names, self.progress, self.pool = density, spectral_names, progress, pool
        self.groups: dict[tuple, GeometrySums] = {}
        self.kinds: dict[str, GeometrySums] = {}
        self.overall = GeometrySums(self.n)
        self.pending: list[tuple[str, list[torch.Tensor], Any]] = []

    def add(self, name: str, tensors: list[torch.Tensor]) -> None:
        weights, reference = tensors[:self.n], (tensors[self.n] if self.has_base else None)
        spectral = name in self.spectral_names
        if self.pool is not None and weights[0].numel() < SMALL_NUMEL:  # a whole name per worker
            found = self.pool.submit(tensor_sums, weights, reference, self.density, spectral=spectral)
        else:  # a big name: its blocks spread over the workers
            found = tensor_sums(weights, reference, self.density, spectral=spectral, pool=self.pool)
        self.pending.append((name, tensors, found))
        while self.pending and not (isinstance(self.pending[0][2], Future) and not self.pending[0][2].done()):
            self._settle()

    def finish(self) -> tuple[dict[tuple, GeometrySums], dict[str, GeometrySums], GeometrySums]:
        while self.pending:
            self._settle()
        return self.groups, self.kinds, self.overall

    def _settle(self) -> None:
        name, tensors, found = self.pending.pop(0)
        sums = found.result() if isinstance(found, Future) else found
        _check_finite(self.labels, name, sums, tensors[:self.n], tensors[self.n] if self.has_base else None)
        self.groups.setdefault(_group_of(name), GeometrySums(self.n)).add(sums)
        self.kinds.setdefault(tensor_kind(name), GeometrySums(self.n)).add(sums)
        self.overall.add(sums)
        if self.progress is not None:
            self.progress.advance(sum(t.numel() * t.element_size() for t in tensors))


def _observe_plan(ckpts: list[Checkpoint], names: list[str]) -> Plan:
    """inspect as the engine runs it: one observe job per tensor name, reading it from every checkpoint."""
    jobs = [Job(name=name, shape=tuple(ckpts[0].shape(name)), dtype=ckpts[0].dtype(name), op="observe",
                inputs=tuple(TensorRef(i, name) for i in range(len(ckpts)))) for name in names]
    return Plan(None, ckpts, jobs)


def _accumulate(models: list[tuple[str, Mapping]], base: Mapping | None, names: list[str], density: float,
                spectral_names: set[str], show_progress: bool = False, pool: Executor | None = None
                ) -> tuple[dict[tuple, GeometrySums], dict[str, GeometrySums], GeometrySums]:
    """Geometry sums per group, per kind and overall. Checkpoints stream through engine.run (an
    observe-only plan: prefetch, unchanged-file checks, pages released after use); in-memory mappings
    (state dicts, lazy loaders) are read name by name as they are."""
    mappings = [m for _, m in models] + ([base] if base is not None else [])
    labels = [label for label, _ in models]
    if all(isinstance(m, Checkpoint) for m in mappings):
        sums = _Sums(labels, base is not None, density, spectral_names, None, pool)

        def observe(job: Job, rows, tensors, bad) -> None:  # as stored: the compiled pass reads bfloat16 in place
            sums.add(job.name, [tensors[ref] for ref in job.inputs])

        # NaN/Inf shows in the float64 sums of squares (_check_finite): the engine's own scan is not needed
        sink = Sink()
        sink.known_finite = {(str(m.path), name) for m in mappings for name in names}
        run(_observe_plan(mappings, names), sink, observe, show_progress=show_progress, label="inspecting")
        found = sums.finish()
        for ck in mappings:  # small names were computed on the workers after the engine's own check
            ck.check_unchanged()
        return found
    total = sum(_nbytes(m, name) for name in names for m in mappings)
    with ByteProgress(len(names), total, enabled=show_progress, label="inspecting") as progress:
        sums = _Sums(labels, base is not None, density, spectral_names, progress, pool)
        for name in names:  # one name at a time: a lazy loader's tensors are made on each read
            sums.add(name, [m[name] for m in mappings])
            sums.finish()
        return sums.finish()


def _one_torch_thread() -> None:
    # Per worker thread (OpenMP's and MKL's thread counts are thread-local): the small QR/SVD calls of the
    # spectral overlap spend more in a thread team's spin-waits than in arithmetic, and the pool already
    # keeps every core busy. The caller's own setting is left as it is.
    torch.set_num_threads(1)


@contextlib.contextmanager
def _workers() -> Iterator[Executor | None]:
    """Threads for the compiled blocks and the SVDs: as many as torch's thread count (None: just this one)."""
    threads = torch.get_num_threads()
    if threads <= 1:
        yield None
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergelab-inspect",
                            initializer=_one_torch_thread) as pool:
        yield pool


def inspect_models(paths: Sequence[str | Path | Mapping[str, torch.Tensor]],
                   base: str | Path | Mapping[str, torch.Tensor] | None = None, *,
                   density: float = 0.2, spectral_layers: int | None = SPECTRAL_LAYERS,
                   show_progress: bool = False) -> InspectReport:
    """Data-free geometry of the task vectors of `paths`, per layer, per kind and overall.

    Args:
        paths: model checkpoints (anything `Checkpoint` opens) or state dicts, all of
            one architecture.
        base: the model they were fine-tuned from. Without it, task vectors are the
            deviations from the models' mean; those of two models are exact opposites
            (cosine -1), so pairwise task-vector numbers only mean something with a base.
        density: share kept by the TIES-style trim before the trimmed sign-conflict count.
        spectral_layers: spectral overlap (an SVD per model and 2-D tensor, the costly
            statistic) is measured on the 2-D tensors of this many evenly spaced layers
            (first and last included) and on every tensor outside the layers; None: all
            layers, 0: no layer.
        show_progress: a progress bar (tensors, bytes read per second, time left) on stderr.

    The work runs on torch.get_num_threads() threads of its own (compiled blocks release the GIL).

    Raises:
        ShapeMismatch: a tensor has different shapes in two inputs.
        NonFiniteError: a tensor holds NaN or Inf.
        CheckpointError: an input file changed while it was read.
        MergeError: fewer than two models (one with a base), density outside (0, 1], or a
            negative spectral_layers.
    """
    if not 0 < density <= 1:
        raise MergeError(f"inspect: density must be in (0, 1], got {density}")
    if spectral_layers is not None and spectral_layers < 0:
        raise MergeError(f"inspect: spectral_layers must be >= 0 (or None for all), got {spectral_layers}")
    if len(paths) < (1 if base is not None else 2):
        raise MergeError("inspect needs at least two models, or one model and a base (base=)", option="base")
    with contextlib.ExitStack() as opened:
        models = [_open(p, f"model_{i}", opened) for i, p in enumerate(paths)]
        base_src = _open(base, "base", opened) if base is not None else None
        names, skipped = _plan(models + ([base_src] if base_src else []))
        spectral_names = _spectral_sample(names, spectral_layers)
        with _workers() as pool:
            groups, kinds, overall = _accumulate(models, base_src[1] if base_src else None, names, density,
                                                 spectral_names, show_progress, pool)
    return InspectReport(
        models=[label for label, _ in models], base=base_src[0] if base_src else None,
        reference="base" if base_src else "mean", density=density, spectral_layers=spectral_layers,
        groups=[GroupStats.from_sums(f"layer {key[1]}" if key[0] == 0 else str(key[1]), groups[key])
                for key in sorted(groups)],
        kinds={k: GroupStats.from_sums(k, kinds[k]) for k in KINDS if k in kinds},
        overall=GroupStats.from_sums("overall", overall), skipped=skipped,
    )
