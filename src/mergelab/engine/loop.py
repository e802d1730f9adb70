"""The one loop: every command that streams weights runs a plan through `run(plan, sink, observe)`.

Memory holds the current work item's tensors and the next one's (paged in by a prefetch thread
while the current one computes). Big tensors of elementwise methods are merged in row chunks, so
memory does not grow with N x tensor size. Three threads, each mostly outside the GIL (the kernels
are compiled nogil): the prefetch thread maps the next item's pages in and checks them for NaN/Inf
and for changed files, this one computes, the writer thread checks each output and hands it to the
sink (at most WRITE_QUEUE_BYTES waiting).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from mergelab.device import resolve_device
from mergelab.engine import items as limits
from mergelab.engine.compute import compute
from mergelab.engine.inputs import Reader, described, stage
from mergelab.engine.items import Rows, item_bytes, work_items
from mergelab.engine.lanes import run_lanes
from mergelab.engine.report import RunReport
from mergelab.engine.sinks import Sink
from mergelab.errors import NonFiniteError
from mergelab.methods.kernels import has_nonfinite
from mergelab.plan import Job, Plan
from mergelab.progress import ByteProgress


def _check_and_write(sink: Sink, job: Job, rows: Rows, outs: dict[str, torch.Tensor], check: bool,
                     side: dict) -> None:
    """On the writer thread: refuse an output that came out NaN/Inf (when `check`), else hand it and its
    side tensors (methods with side outputs) to the sink."""
    for name, out in outs.items():
        if check and has_nonfinite(out):
            raise NonFiniteError(
                f"the merge of {name} came out NaN or Inf from finite inputs (weights or other recipe "
                "numbers too large for the output dtype?); nothing was written. Check the recipe's numbers")
    for name, out in outs.items():
        sink.write(name, rows, out)
    for name, tensors in side.items():
        sink.write_side(name, tensors)


class WriteQueue:
    """Outputs handed to the writer thread, at most WRITE_QUEUE_BYTES of them waiting (one always fits).

    The writer's errors (a full disk, a non-finite output) come back from put() or drain(), in order.
    """

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.flight: list[tuple[Future, int]] = []

    def put(self, nbytes: int, fn, *args) -> None:
        while self.flight and (self.flight[0][0].done()
                               or sum(n for _, n in self.flight) + nbytes > limits.WRITE_QUEUE_BYTES):
            self.flight.pop(0)[0].result()
        self.flight.append((self.pool.submit(fn, *args), nbytes))

    def drain(self) -> None:
        while self.flight:
            self.flight.pop(0)[0].result()


class _Run:
    """The state of one run: its reader, threads, report notes."""

    def __init__(self, plan: Plan, sink: Sink, observe, device: torch.device, seed: int | None,
                 allow_nonfinite: bool):
        self.plan, self.sink, self.observe, self.device, self.seed = plan, sink, observe, device, seed
        self.allow_nonfinite = allow_nonfinite
        self.reader = Reader(plan.checkpoints, sink.known_finite)
        self.notes: dict[str, list[str]] = {}  # job name -> warnings its method raised (into the report)
        self.nonfinite: list[str] = []

    def check(self, job: Job, bad: list) -> None:
        if bad and not self.allow_nonfinite:
            raise NonFiniteError(
                f"input {described(self.plan, bad[0])} holds NaN or Inf values, so the merge of {job.name} would be "
                "NaN or silently wrong; nothing was written. Repair or leave out that checkpoint, or allow non-finite "
                "inputs (allow_nonfinite=True), which writes the merge and lists every such tensor",
                option="allow_nonfinite")
        self.nonfinite.extend(d for d in (described(self.plan, ref) for ref in bad) if d not in self.nonfinite)

    def loop(self, items: list, pool: ThreadPoolExecutor, queue: WriteQueue, progress: ByteProgress) -> None:
        reader, plan = self.reader, self.plan
        pending: Future | None = pool.submit(stage, reader, *items[0]) if items else None
        released: list[Future] = []  # page releases handed to the prefetch thread (FIFO, after its prefetch)
        for i, (job, rows) in enumerate(items):
            if pending is not None:
                inputs, bad = pending.result()  # its own check ran after paging in
            else:
                while released:
                    released.pop(0).result()  # two big items are never resident at once
                reader.check_unchanged(job)
                inputs = reader.inputs(job, rows)
                bad = reader.nonfinite(inputs)
            nxt = items[i + 1] if i + 1 < len(items) else None
            # Prefetch overlaps paging in with computing, but two big items must not be resident at once.
            small = nxt is not None and (item_bytes(plan, *nxt) <= limits.PREFETCH_LIMIT
                                         or item_bytes(plan, job, rows) <= limits.PREFETCH_LIMIT)
            pending = pool.submit(stage, reader, *nxt) if small else None
            nread = inputs.nbytes
            if self.observe is not None:
                self.observe(job, rows, inputs.tensors, bad)
            self.check(job, bad)
            side: dict = {}
            outs = compute(plan, job, inputs, self.device, self.seed, rows, self.notes, side)
            reader.check_unchanged(job)
            del inputs
            while released and released[0].done():
                released.pop(0).result()  # errors surface here
            if not self.sink.keep_inputs:
                released.append(pool.submit(reader.release, job, rows))
            if outs:
                queue.put(sum(t.numel() * t.element_size() for t in outs.values()), _check_and_write,
                          self.sink, job, rows, outs, not bad and not self.allow_nonfinite, side)
            del outs
            progress.advance(nread, done=rows is None or rows[1] == job.shape[0])
        queue.drain()
        for future in released:
            future.result()

    def report(self, seconds: float) -> RunReport:
        plan, notes = self.plan, self.notes
        return RunReport(
            out_dir=self.sink.out_dir, tensors=len(plan.jobs),
            merged=sum(1 for j in plan.jobs if j.op == "merge"),
            copied=[(j.name, "; ".join(filter(None, [j.note, *notes.get(j.name, [])]))) for j in plan.jobs
                    if j.copy or j.note or notes.get(j.name)],
            left_out=plan.left_out, bytes_read=plan.bytes_read, bytes_written=plan.bytes_written,
            seconds=seconds, device=str(self.device), nonfinite=self.nonfinite)


def _run_direct(plan: Plan, sink: Sink, jobs, device: torch.device) -> list[Job]:
    """Run the jobs the sink writes itself (Sink.direct), `sink.lanes` at a time; the others are returned.

    Their inputs are the sink's own (a search keeps them mapped and checked once per search), so
    neither the prefetch thread nor the output check sees them, as none did on the search's path.
    """
    tasks, rest = [], []
    for job in jobs:
        task = sink.direct(plan, job, device)
        if task is None:
            rest.append(job)
        else:
            tasks.append(task)
    if tasks:
        run_lanes(tasks, sink.lanes)
    return rest


def run(plan: Plan, sink: Sink | None = None, observe=None, *, device: str = "cpu", seed: int | None = None,
        allow_nonfinite: bool = False, show_progress: bool = False, label: str = "merging") -> RunReport:
    """Run every job of `plan` into the sink; returns the run's report.

    Inputs holding NaN/Inf stop the run (NonFiniteError, nothing written) unless `allow_nonfinite`,
    in which case they are merged as they are and listed in the report. Input files are checked
    unchanged after paging in and after computing. `observe(job, rows, tensors, nonfinite)`, if
    given, sees each work item's input tensors (ref -> view, as stored) and which of them hold NaN/Inf
    before the job runs, so statistics come from the same single read (averages, inspect); an
    exception it raises stops the run with nothing written. The sink picks the jobs (Sink.select)
    and may write some itself, in lanes before the loop (Sink.direct; not when observing).
    """
    dev = resolve_device(device)
    sink = sink if sink is not None else Sink()
    state = _Run(plan, sink, observe, dev, seed, allow_nonfinite)
    start = time.perf_counter()
    sink.open(plan)
    try:
        jobs = sink.select(plan)
        items = list(work_items(plan, jobs if observe is not None else _run_direct(plan, sink, jobs, dev)))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-prefetch") as pool, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-write") as write_pool, \
                ByteProgress(len(plan.jobs), plan.bytes_read, enabled=show_progress, label=label) as progress, torch.no_grad():
            state.loop(items, pool, WriteQueue(write_pool), progress)
        report = state.report(time.perf_counter() - start)
        sink.finish(plan, report)
    except BaseException:
        sink.abort()
        raise
    report.seconds = time.perf_counter() - start
    return report
