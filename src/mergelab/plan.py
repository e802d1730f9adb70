"""A plan: one job per output tensor, decided before any tensor is read (planner.py makes it from a recipe).

A plan names, for every output tensor, the input tensors (checkpoint, name) it is computed
from, the op (merge, copy, factorize, permute, expert, observe), the method and its resolved
parameters. The engine runs it (engine.run); nothing in it is decided while tensors are read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch

from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.writer import TensorInfo
from mergelab.methods import MethodParams, MethodSpec
from mergelab.tokenizer import VocabJob


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One input tensor: which checkpoint, which name inside it."""

    model: int
    name: str


# What a job does with its input tensors (engine/compute.py runs each):
#   merge      the plan's method over inputs (and base, stats)     -> one output tensor, maybe in row chunks
#   copy       inputs[0] as it is (converted to the output dtype)  -> one output tensor
#   factorize  fn(inputs) -> {name: tensor}: low-rank factors (extract-lora; a module's merged adapter factors)
#   permute    fn(inputs) -> tensor, an input with permuted rows/columns (align)
#   expert     fn(inputs) -> {name: tensor}, expert and gate tensors of a mixture of experts (moe)
#   rebuild    fn(inputs) -> tensor, one task's tensor from a merged one, its base and side data (task_models)
#   observe    nothing written: the run's `observe` callback sees the inputs (inspect, statistics)
Op = Literal["merge", "copy", "factorize", "permute", "expert", "rebuild", "observe"]
FN_OPS = ("factorize", "permute", "expert", "rebuild")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """How to compute one output tensor (or several, or none): a sealed record, built once with keywords.

    The engine reads it and never changes it; what a method warns about while
    merging goes into the run's report (RunReport.copied), not into the job.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype
    inputs: tuple[TensorRef, ...]  # the stacked models x (non-base models, or all for base-ignoring methods)
    base: TensorRef | None = None
    model_params: tuple[MethodParams, ...] = ()  # one per input
    shared: MethodParams | None = None
    op: Op = "merge"
    # factorize/permute/expert: fn(tensors, device) with the inputs' tensors as stored (refs() order, on
    # device) returns the output tensor (permute) or {output name: tensor} (factorize, expert).
    fn: Callable[[list[torch.Tensor], torch.device], Any] | None = dataclasses.field(default=None, compare=False)
    outputs: tuple[TensorInfo, ...] | None = None  # what fn writes when it is not (name, shape, dtype)
    vocab_rows: int | None = None  # resize every input's first dim to this (vocab_mismatch: resize)
    vocab_fill: TensorRef | None = None  # where padding rows come from
    stats: tuple[TensorRef, ...] | None = None  # per-input statistics (methods with needs_stats)
    base_stats: TensorRef | None = None  # the base model's statistics (methods with uses_base_stats)
    vocab: VocabJob | None = None  # rows moved into the output vocabulary by token (mergelab.tokenizer)
    note: str | None = None

    def __post_init__(self) -> None:
        if (self.op in FN_OPS) != (self.fn is not None):
            raise ValueError(f"job {self.name}: op {self.op} {'needs' if self.op in FN_OPS else 'takes no'} fn")

    @property
    def copy(self) -> bool:
        """Copied from inputs[0] without a method."""
        return self.op == "copy"

    @property
    def layout(self) -> tuple[TensorInfo, ...]:
        """The output tensors this job writes (none for observe)."""
        if self.op == "observe":
            return ()
        return self.outputs if self.outputs is not None else (TensorInfo(self.name, tuple(self.shape), self.dtype),)

    def refs(self) -> list[TensorRef]:
        out = list(self.inputs)
        if self.base is not None:
            out.append(self.base)
        if self.vocab_fill is not None and self.vocab_fill not in out:
            out.append(self.vocab_fill)
        return out + list(self.stats or []) + ([self.base_stats] if self.base_stats is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.layout)


@dataclasses.dataclass
class OutputSpec:
    """What a checkpoint folder gets besides the tensors: config and tokenizer files."""

    config_updates: dict = dataclasses.field(default_factory=dict)
    assets_from: Checkpoint | None = None  # config.json, tokenizer ... copied from this input's folder
    tokenizer_files: dict[str, bytes] | None = None  # the output tokenizer, when it is not assets_from's


@dataclasses.dataclass
class Plan:
    """Everything the engine needs: the method, dtypes, jobs, inputs, what was left out, the output.

    The recipe stays with its caller (the API and the model card); a plan does not carry it.
    `method` is None for plans without merge jobs (inspect, extract-lora).
    """

    method: MethodSpec | None
    checkpoints: list[Checkpoint]
    jobs: list[Job]
    left_out: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (model path, tensor, reason)
    output: OutputSpec = dataclasses.field(default_factory=OutputSpec)
    compute_dtype: torch.dtype = torch.float32  # what reference methods compute in
    ignored: tuple[str, ...] = ()  # recipe parameters that no tensor used, as the report words them

    @property
    def layout(self) -> list[TensorInfo]:
        return [info for job in self.jobs for info in job.layout]

    @property
    def bytes_read(self) -> int:
        seen: set[TensorRef] = set()
        total = 0
        for job in self.jobs:
            for ref in job.refs():
                if ref not in seen:
                    seen.add(ref)
                    total += self.checkpoints[ref.model].nbytes(ref.name)
        return total

    @property
    def bytes_written(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    # The output spec's fields, as the plan named them before it had one.
    @property
    def config_updates(self) -> dict:
        return self.output.config_updates

    @property
    def assets_from(self) -> Checkpoint | None:
        return self.output.assets_from

    @property
    def tokenizer_files(self) -> dict[str, bytes] | None:
        return self.output.tokenizer_files
