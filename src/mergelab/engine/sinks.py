"""Where a run's outputs go: a checkpoint folder, tensors in memory, or nowhere (observe-only plans).

A sink is told the plan before anything is read (`open`: check the destination, so a bad output
path fails before the first tensor), chooses the jobs to run (`select`), may write some itself
(`direct`: tasks the engine runs in its lanes, e.g. a kernel's `into` for search candidates), receives every output tensor or row range on the writer
thread (`write`; a method's side tensors, e.g. per-task masks, through `write_side`), and is finished
with the run's report or aborted (nothing half-written is left).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import torch

from mergelab.checkpoint.writer import CheckpointWriter
from mergelab.engine.lanes import Task
from mergelab.engine.side_files import side_output_files
from mergelab.errors import MergeError, ShapeMismatch
from mergelab.plan import Job, Plan


class Sink:
    """Base sink: takes every job, writes nothing (an observe-only run)."""

    out_dir: Path | None = None
    keep_inputs = False  # leave the inputs' pages mapped after each item (searches merge them again and again)
    # (checkpoint path, tensor name) of inputs already scanned finite (a search scans each once), or None
    known_finite: AbstractSet[tuple[str, str]] | None = None

    lanes = 1  # direct jobs run this many at a time (engine/lanes.py)

    def open(self, plan: Plan) -> None:
        """Check the destination against the plan, before any tensor is read."""

    def select(self, plan: Plan) -> Sequence[Job]:
        """The jobs to run (a search's model skips those whose result it already holds): all of them."""
        return plan.jobs

    def direct(self, plan: Plan, job: Job, device: torch.device) -> Task | None:
        """A task that writes `job`'s output into the sink itself (a kernel straight into a preallocated
        tensor, run in the lanes before the loop), or None: the loop computes it and write() receives it."""
        return None

    def write(self, name: str, rows: tuple[int, int] | None, tensor: torch.Tensor) -> None:
        raise MergeError(f"this run writes no tensors, but a job produced {name}")

    def write_side(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Side tensors of output `name` (methods with side outputs, e.g. per-task masks): not kept."""

    def finish(self, plan: Plan, report) -> None:
        """Everything was written: make the result final."""

    def abort(self) -> None:
        """The run failed: leave nothing half-written."""


class FolderSink(Sink):
    """A sharded safetensors checkpoint folder, written into a temporary folder and renamed into place.

    protected: folders or files the output may not equal, be inside or contain (besides the plan's
    inputs, always protected). extra_files_fn(report) -> {relative path: text or bytes} written last.
    A method's side tensors are kept and written as its side files (engine/side_files.py) with the model.
    """

    def __init__(self, out_dir: str | Path, *, shard_size: int = 5 * 10**9, overwrite: bool = False,
                 protected: Sequence[Path] = (), extra_files_fn: Callable | None = None,
                 copy_tokenizer: bool = True, copy_files: Mapping[str, Path] | None = None):
        self.out_dir = Path(out_dir)
        self.shard_size, self.overwrite, self.protected = shard_size, overwrite, list(protected)
        self.extra_files_fn, self.copy_tokenizer, self.copy_files = extra_files_fn, copy_tokenizer, copy_files
        self.writer: CheckpointWriter | None = None
        self.side: dict[str, dict[str, torch.Tensor]] = {}

    def open(self, plan: Plan) -> None:
        protected = [*(Path(ck.folder or ck.path) for ck in plan.checkpoints), *self.protected]
        self.writer = CheckpointWriter(self.out_dir, plan.layout, shard_size=self.shard_size,
                                       overwrite=self.overwrite, protected=protected)

    def write(self, name: str, rows: tuple[int, int] | None, tensor: torch.Tensor) -> None:
        if rows is None:
            self.writer.write(name, tensor)
        else:
            self.writer.write_rows(name, rows[0], tensor)

    def write_side(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.side[name] = tensors

    def finish(self, plan: Plan, report) -> None:
        extra = self.extra_files_fn(report) if self.extra_files_fn else None
        if plan.method is not None and plan.method.side_outputs is not None:
            extra = {**(extra or {}), **side_output_files(plan, self.side)}
        out = plan.output
        if out.tokenizer_files is not None:  # a rebuilt tokenizer replaces the copied one (MergeKit writes it too)
            extra = {**out.tokenizer_files, **(extra or {})}
        self.writer.finish(assets_from=out.assets_from.folder if out.assets_from is not None else None,
                           config_updates=out.config_updates, extra_files=extra,
                           copy_tokenizer=self.copy_tokenizer and out.tokenizer_files is None,
                           copy_files=self.copy_files)

    def abort(self) -> None:
        self.side.clear()
        if self.writer is not None:
            self.writer.abort()


class MemorySink(Sink):
    """Preallocated tensors (e.g. a module's state dict, sharing the parameters' storage).

    Every output's result is copied into `tensors[name]` (converted by copy_ where the dtype differs),
    chunk by chunk, with the same jobs, chunks and generators as a folder run, so the numbers are
    those `mergelab merge` writes. keep_inputs: leave the inputs' pages mapped between runs.
    known_finite: inputs the caller has already scanned for NaN/Inf (they are not scanned again).
    """

    def __init__(self, tensors: MutableMapping[str, torch.Tensor], *, keep_inputs: bool = False,
                 known_finite: AbstractSet[tuple[str, str]] | None = None):
        self.tensors = tensors
        self.keep_inputs = keep_inputs
        self.known_finite = known_finite

    def open(self, plan: Plan) -> None:
        infos = plan.layout
        missing = [i.name for i in infos if i.name not in self.tensors]
        if missing:
            raise MergeError(f"the in-memory model has no tensor {missing[0]!r} (and {len(missing) - 1} more) that "
                             "the merge produces; build the template model with the checkpoints' architecture")
        for i in infos:
            if tuple(self.tensors[i.name].shape) != tuple(i.shape):
                raise ShapeMismatch(f"tensor {i.name} of the merge has shape {tuple(i.shape)}, the in-memory model "
                                    f"has {tuple(self.tensors[i.name].shape)}; build it with the checkpoints' config")

    def write(self, name: str, rows: tuple[int, int] | None, tensor: torch.Tensor) -> None:
        target = self.tensors[name]
        with torch.no_grad():
            (target if rows is None else target[rows[0]:rows[1]]).copy_(tensor)


class CollectSink(Sink):
    """Every output kept in memory (`tensors`: name -> tensor, owned) for the caller, which makes them
    final only after the whole run succeeded (extract-lora and adapter merges write their adapter folder
    then), so a failed run writes nothing."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, rows: tuple[int, int] | None, tensor: torch.Tensor) -> None:
        if rows is not None:
            raise MergeError(f"{name}: a collecting sink takes whole tensors, got rows {rows}")
        self.tensors[name] = tensor.clone()  # copies are views of the mapped inputs: own the bytes

    def abort(self) -> None:
        self.tensors.clear()
