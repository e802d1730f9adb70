"""Work items: one per job, or row chunks of a big elementwise merge; what each one reads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mergelab.plan import Job, Plan

# Elementwise merges of tensors above this many elements run in row chunks of
# about this size: bounded scratch memory whatever the embedding size.
CHUNK_ELEMENTS = 16 * 1024 * 1024
# A job whose inputs exceed this is not read ahead while another such job computes.
PREFETCH_LIMIT = 128 * 1024 * 1024
# Merged outputs waiting for the writer thread, in bytes (one output always fits): the merge
# computes ahead while the disk catches up, in bounded memory.
WRITE_QUEUE_BYTES = 128 * 1024 * 1024

Rows = tuple[int, int] | None
Item = tuple[Job, Rows]


def item_bytes(plan: Plan, job: Job, rows: Rows) -> int:
    """Bytes a work item reads (its share of the job's inputs for a row range)."""
    total = sum(plan.checkpoints[r.model].nbytes(r.name) for r in job.refs())
    if rows is not None and job.shape:
        total = total * (rows[1] - rows[0]) // job.shape[0]
    return total


def _chunkable(plan: Plan, job: Job) -> bool:
    numel = 1
    for d in job.shape:
        numel *= d
    return (job.op == "merge" and plan.method is not None and plan.method.elementwise and numel > CHUNK_ELEMENTS
            and len(job.shape) >= 2 and not job.vocab_rows and not job.stats and job.vocab is None)


def work_items(plan: Plan, jobs: Sequence[Job] | None = None) -> Iterator[Item]:
    """(job, row range) pairs: one per job, or several for big elementwise merges."""
    for job in plan.jobs if jobs is None else jobs:
        if not _chunkable(plan, job):
            yield job, None
            continue
        row = 1
        for d in job.shape[1:]:
            row *= d
        step = max(1, CHUNK_ELEMENTS // row)
        for start in range(0, job.shape[0], step):
            yield job, (start, min(job.shape[0], start + step))
