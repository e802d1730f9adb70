"""The engine: runs any plan, job by job, from memory-mapped inputs into a sink.

    run(plan, sink, observe=None, *, device, seed, allow_nonfinite, show_progress) -> RunReport

Sinks (engine/sinks.py): FolderSink (a checkpoint folder, written atomically), MemorySink
(preallocated tensors: in-memory candidates), CollectSink (outputs kept in memory for the
caller: the adapters of extract-lora and adapter merges), and the base Sink (observe-only runs). A sink
may pick the jobs to run (Sink.select) and write some itself (Sink.direct: kernels straight into
its tensors, run side by side in the lanes, engine/lanes.py, before the loop). A job's op
(plan.Job.op) says what it computes: merge, copy, factorize, permute, expert, observe. `execute`
and `execute_into` are the two common runs spelled out.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from pathlib import Path

import torch

from mergelab.engine.compute import compute
from mergelab.engine.items import CHUNK_ELEMENTS, PREFETCH_LIMIT, WRITE_QUEUE_BYTES, work_items
from mergelab.engine.loop import WriteQueue, run
from mergelab.engine.report import RunReport
from mergelab.engine.sinks import CollectSink, FolderSink, MemorySink, Sink
from mergelab.plan import Plan

__all__ = ["run", "execute", "execute_into", "RunReport", "Sink", "FolderSink", "MemorySink", "CollectSink", "compute",
           "work_items", "WriteQueue",
           "CHUNK_ELEMENTS", "PREFETCH_LIMIT", "WRITE_QUEUE_BYTES"]


def execute(plan: Plan, out_dir: str | Path, *, device: str = "cpu", seed: int | None = None,
            shard_size: int = 5 * 10**9, overwrite: bool = False, show_progress: bool = True,
            extra_files_fn=None, allow_nonfinite: bool = False, copy_tokenizer: bool = True,
            protected: Sequence[Path] = (), observe=None, copy_files=None) -> RunReport:
    """Run `plan` into a checkpoint folder at `out_dir` (FolderSink), atomically.

    The output may not touch the plan's inputs nor `protected` (e.g. the originals of aligned
    copies); that is checked before anything is read. `copy_files` (name -> path) are copied into
    the output; `extra_files_fn(report)` gives files written beside the weights.
    """
    sink = FolderSink(out_dir, shard_size=shard_size, overwrite=overwrite, protected=protected,
                      extra_files_fn=extra_files_fn, copy_tokenizer=copy_tokenizer, copy_files=copy_files)
    return run(plan, sink, observe, device=device, seed=seed, allow_nonfinite=allow_nonfinite,
               show_progress=show_progress)


def execute_into(plan: Plan, outputs: MutableMapping[str, torch.Tensor], *, device: str = "cpu",
                 seed: int | None = None, keep_inputs: bool = False, known_finite=None) -> RunReport:
    """Run `plan` into preallocated tensors (MemorySink): the numbers execute() writes."""
    return run(plan, MemorySink(outputs, keep_inputs=keep_inputs, known_finite=known_finite), device=device,
               seed=seed)
