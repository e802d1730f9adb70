"""A work item's input tensors: memory-map views, paged in ahead, checked, released.

Inputs are never copied into buffers of our own: the merge reads the page
cache directly (the float32 conversion of the reference methods reads from it too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Set as AbstractSet

import torch

from mergelab.checkpoint.prefetch import Prefetcher
from mergelab.checkpoint.reader import Checkpoint
from mergelab.engine.items import Rows
from mergelab.methods.kernels import has_nonfinite
from mergelab.plan import Job, Plan, TensorRef


@dataclasses.dataclass
class Inputs:
    """A work item's input tensors: views of the inputs' memory maps, nothing read yet."""

    tensors: dict[TensorRef, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Reader:
    """A job's (or a row range's) input tensors as memory-map views, prefetched and released by
    checkpoint.prefetch.Prefetcher, which keeps the madvise bookkeeping.

    known_finite: (checkpoint path, tensor name) of inputs already scanned finite, not scanned again.
    """

    def __init__(self, checkpoints: list[Checkpoint], known_finite: AbstractSet[tuple[str, str]] | None = None):
        self.pages = Prefetcher(checkpoints)
        self.known_finite = known_finite or frozenset()

    def inputs(self, job: Job, rows: Rows) -> Inputs:
        return Inputs(self.pages.views(job.refs(), rows))

    def prefetch(self, job: Job, rows: Rows) -> None:
        self.pages.prefetch(job.refs(), rows)

    def check_unchanged(self, job: Job) -> None:
        self.pages.check_unchanged(job.refs())

    def release(self, job: Job, rows: Rows) -> None:
        self.pages.release(job.refs(), rows)

    def nonfinite(self, inputs: Inputs) -> list[TensorRef]:
        """The inputs of a work item that hold NaN or Inf (see has_nonfinite), known-finite ones skipped."""
        ckpts = self.pages.ckpts
        return [ref for ref, t in inputs.tensors.items()
                if (str(ckpts[ref.model].path), ref.name) not in self.known_finite and has_nonfinite(t)]


def stage(reader: Reader, job: Job, rows: Rows) -> tuple[Inputs, list[TensorRef]]:
    """On the prefetch thread: page a work item's inputs in, check the files, and look for NaN/Inf in them.

    Returns the item's inputs (views, mapped in) and those of them holding NaN/Inf, so that the
    compute thread uses the very views that were checked.
    """
    reader.prefetch(job, rows)
    inputs = reader.inputs(job, rows)
    return inputs, reader.nonfinite(inputs)


def described(plan: Plan, ref: TensorRef) -> str:
    """An input as the report and messages name it: "tensor (checkpoint path)"."""
    return f"{ref.name} ({plan.checkpoints[ref.model].path})"
