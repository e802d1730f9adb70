"""Execute a plan: stream tensors in, merge on the chosen device, stream out.

Memory holds the current job's tensors and the next job's (prefetched by a
reader thread while the current one computes). Big tensors of elementwise
methods are merged in row chunks, so memory does not grow with
N x tensor size. The output goes through CheckpointWriter, which writes into
a temporary folder and renames it into place only when everything is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from mergelab.checkpoint.prefetch import Prefetcher
from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.writer import CheckpointWriter, TensorInfo
from mergelab.errors import InvalidInput, NonFiniteError
from mergelab.methods import PerModel, run_method
from mergelab.methods.kernels import has_nonfinite
from mergelab.plan import Job, Plan, TensorRef
from mergelab.progress import ByteProgress

# Elementwise merges of tensors above this many elements run in row chunks of
# about this size: bounded scratch memory whatever the embedding size.
CHUNK_ELEMENTS = 16 * 1024 * 1024
# A job whose inputs exceed this is not read ahead while another such job computes.
PREFETCH_LIMIT = 128 * 1024 * 1024
# Merged outputs waiting for the writer thread, in bytes (one output always fits): the merge
# computes ahead while the disk catches up, in bounded memory.
WRITE_QUEUE_BYTES = 128 * 1024 * 1024


def _item_bytes(plan: Plan, job: Job, rows: tuple[int, int] | None) -> int:
    total = sum(plan.checkpoints[r.model].nbytes(r.name) for r in job.refs())
    if rows is not None and job.shape:
        total = total * (rows[1] - rows[0]) // job.shape[0]
    return total


@dataclasses.dataclass
class RunReport:
    out_dir: Path
    tensors: int
    merged: int
    copied: list[tuple[str, str]]
    left_out: list[tuple[str, str, str]]
    bytes_read: int
    bytes_written: int
    seconds: float
    device: str
    nonfinite: list[str] = dataclasses.field(default_factory=list)  # "tensor (model path)" with NaN/Inf inputs


def tensor_seed(seed: int | None, name: str) -> int:
    """A 63-bit seed from (seed, tensor name): results do not depend on processing order."""
    digest = hashlib.sha256(f"{seed if seed is not None else 0}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int | None, name: str, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(tensor_seed(seed, name))
    return gen


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInput(f"device {device!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise InvalidInput(f"device {device!r}: mergelab merges on cpu or cuda (cuda:N); use one of those")
    if dev.type == "cuda" and not torch.cuda.is_available():
        from mergelab.errors import MergeError

        raise MergeError("device cuda was asked for but torch sees no CUDA GPU; merge on the cpu (device=\"cpu\", --device cpu)")
    return dev


@dataclasses.dataclass
class _Inputs:
    """A work item's input tensors: views of the inputs' memory maps, nothing read yet."""

    tensors: dict[TensorRef, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class _Reader:
    """A job's (or a row range's) input tensors as memory-map views, prefetched and released by
    checkpoint.prefetch.Prefetcher, which keeps the madvise bookkeeping.

    Inputs are never copied into buffers of our own: the merge reads the page
    cache directly (the float32 conversion of the reference methods reads from it too).
    """

    def __init__(self, checkpoints: list[Checkpoint]):
        self.pages = Prefetcher(checkpoints)

    def inputs(self, job: Job, rows: tuple[int, int] | None) -> _Inputs:
        return _Inputs(self.pages.views(job.refs(), rows))

    def prefetch(self, job: Job, rows: tuple[int, int] | None) -> None:
        self.pages.prefetch(job.refs(), rows)

    def check_unchanged(self, job: Job) -> None:
        self.pages.check_unchanged(job.refs())

    def release(self, job: Job, rows: tuple[int, int] | None) -> None:
        self.pages.release(job.refs(), rows)


def _fit_vocab(t: torch.Tensor, fill: torch.Tensor | None, want: int) -> torch.Tensor:
    """Cut or pad a vocabulary-indexed tensor's rows to `want` rows (pad from the tokenizer source)."""
    if t.shape[0] == want:
        return t
    if t.shape[0] > want:
        return t[:want]
    assert fill is not None
    return torch.cat([t, fill[t.shape[0]:want].to(t.dtype)], dim=0)


def _work_items(plan: Plan) -> Iterator[tuple[Job, tuple[int, int] | None]]:
    """(job, row range) pairs: one per job, or several for big elementwise jobs."""
    chunkable = plan.recipe.method.elementwise
    for job in plan.jobs:
        numel = 1
        for d in job.shape:
            numel *= d
        if job.copy or not chunkable or numel <= CHUNK_ELEMENTS or len(job.shape) < 2 or job.vocab_rows \
                or job.stats or job.vocab is not None:
            yield job, None
            continue
        row = numel // job.shape[0]
        step = max(1, CHUNK_ELEMENTS // row)
        for start in range(0, job.shape[0], step):
            yield job, (start, min(job.shape[0], start + step))


def _method_inputs(job: Job, inputs: _Inputs, device: torch.device
                   ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(xs, base): the models' tensors and the base's, as stored, on `device`, vocabularies fitted."""
    tensors = inputs.tensors
    fill = tensors.get(job.vocab_fill) if job.vocab_fill is not None else None

    def fit(t: torch.Tensor) -> torch.Tensor:
        t = _fit_vocab(t, fill, job.vocab_rows) if job.vocab_rows is not None else t
        return t.to(device)

    if job.vocab is not None:  # rows matched by token into the output vocabulary (mergelab.tokenizer)
        ins = [tensors[r] for r in job.inputs] + ([tensors[job.base]] if job.base is not None else [])
        moved = [t.to(device) for t in job.vocab.apply(ins)]
        return moved[:len(job.inputs)], moved[len(job.inputs)] if job.base is not None else None
    return [fit(tensors[r]) for r in job.inputs], fit(tensors[job.base]) if job.base is not None else None


def nonfinite_inputs(inputs: _Inputs) -> list[TensorRef]:
    """The inputs of a work item that hold NaN or Inf (see has_nonfinite)."""
    return [ref for ref, t in inputs.tensors.items() if has_nonfinite(t)]


def _described(plan: Plan, ref: TensorRef) -> str:
    """An input as the report and messages name it: "tensor (checkpoint path)"."""
    return f"{ref.name} ({plan.checkpoints[ref.model].path})"


def _stage(reader: _Reader, job: Job, rows: tuple[int, int] | None) -> tuple[_Inputs, list[TensorRef]]:
    """On the prefetch thread: page a work item's inputs in, check the files, and look for NaN/Inf in them.

    Returns the item's inputs (views, mapped in) and their nonfinite_inputs(), so that the compute
    thread uses the very views that were checked.
    """
    reader.prefetch(job, rows)
    inputs = reader.inputs(job, rows)
    return inputs, nonfinite_inputs(inputs)


def _check_and_write(writer: CheckpointWriter, job: Job, rows: tuple[int, int] | None, out: torch.Tensor,
                     check: bool) -> None:
    """On the writer thread: refuse an output that came out NaN/Inf (when `check`), else write it."""
    if check and has_nonfinite(out):
        raise NonFiniteError(
            f"the merge of {job.name} came out NaN or Inf from finite inputs (weights or other recipe "
            "numbers too large for the output dtype?); nothing was written. Check the recipe's numbers")
    if rows is None:
        writer.write(job.name, out)
    else:
        writer.write_rows(job.name, rows[0], out)


class _WriteQueue:
    """Outputs handed to the writer thread, at most WRITE_QUEUE_BYTES of them waiting (one always fits).

    The writer's errors (a full disk, a non-finite output) come back from put() or drain(), in order.
    """

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.flight: list[tuple[Future, int]] = []

    def put(self, nbytes: int, fn, *args) -> None:
        while self.flight and (self.flight[0][0].done()
                               or sum(n for _, n in self.flight) + nbytes > WRITE_QUEUE_BYTES):
            self.flight.pop(0)[0].result()
        self.flight.append((self.pool.submit(fn, *args), nbytes))

    def drain(self) -> None:
        while self.flight:
            self.flight.pop(0)[0].result()


def compute(plan: Plan, job: Job, inputs: _Inputs, device: torch.device,
            seed: int | None, chunk: tuple[int, int] | None, notes: dict[str, list[str]] | None = None
            ) -> torch.Tensor:
    """Run the method of `job` on its inputs (through run_method); the output on CPU in the output dtype.

    Warnings the method raises are added to `notes[job.name]` (for the run's report); the job is not changed.
    """
    if job.copy:
        t = inputs.tensors[job.inputs[0]]
        return (job.vocab.apply([t])[0] if job.vocab is not None else t).to(job.dtype)
    spec = plan.recipe.method
    cdtype = plan.recipe.compute_dtype
    xs, base = _method_inputs(job, inputs, device)
    stats = {}
    if spec.needs_stats:
        stats["stats"] = None if job.stats is None else torch.stack(
            [inputs.tensors[r].to(device=device, dtype=cdtype) for r in job.stats])
    if job.base_stats is not None:
        stats["base_stats"] = inputs.tensors[job.base_stats].to(device=device, dtype=cdtype)
    inputs.tensors.clear()
    gen = None
    if spec.randomized:
        key = job.name if chunk is None else f"{job.name}[{chunk[0]}:{chunk[1]}]"
        gen = make_generator(seed, key, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_method(spec, xs, base, PerModel(job.model_params), job.shared, gen, out_dtype=job.dtype,
                         compute_dtype=cdtype, **stats)
    for w in caught:  # e.g. metric entries floored: kept in the report, not just printed
        note = f"{spec.name}: {w.message}"
        if notes is not None and note not in notes.setdefault(job.name, []):
            notes[job.name].append(note)
    del xs, base, stats
    return out.cpu()


def execute(plan: Plan, out_dir: str | Path, *, device: str = "cpu", seed: int | None = None,
            shard_size: int = 5 * 10**9, overwrite: bool = False, show_progress: bool = True,
            extra_files_fn=None, allow_nonfinite: bool = False, copy_tokenizer: bool = True,
            protected: Sequence[Path] = (), observe=None, copy_files=None) -> RunReport:
    """Run `plan` and write the result atomically to `out_dir`.

    Inputs holding NaN/Inf stop the run (NonFiniteError, nothing written) unless
    `allow_nonfinite`, in which case they are merged as they are and listed in
    the report. The output may not touch the plan's inputs nor `protected` (e.g.
    the originals of aligned copies); that is checked before anything is read.
    `observe(job, rows, tensors, nonfinite)`, if given, sees each work item's input
    tensors (ref -> view, as stored) and which of them hold NaN/Inf (a list of refs)
    before the method runs, so statistics come from the same single read
    (trajectory averages); an exception it raises stops the run
    with nothing written. `copy_files` (name -> path) are copied into the output.
    """
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    layout = [TensorInfo(j.name, tuple(j.shape), j.dtype) for j in plan.jobs]
    protected = [*(Path(ck.folder or ck.path) for ck in plan.checkpoints), *protected]
    reader = _Reader(plan.checkpoints)
    items = list(_work_items(plan))
    notes: dict[str, list[str]] = {}  # job name -> warnings its method raised (into the report)
    nonfinite: list[str] = []
    start = time.perf_counter()
    with CheckpointWriter(out_dir, layout, shard_size=shard_size, overwrite=overwrite,
                          protected=protected) as writer, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-prefetch") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-write") as write_pool, \
            ByteProgress(len(plan.jobs), plan.bytes_read, enabled=show_progress) as progress:
        # Three threads, each mostly outside the GIL (the kernels are compiled nogil): the prefetch
        # thread maps the next item's pages in and checks them for NaN/Inf, this one merges, the
        # writer thread checks the output and writes it (starting its writeback at once).
        pending: Future | None = pool.submit(_stage, reader, *items[0]) if items else None
        released: list[Future] = []  # page releases handed to the prefetch thread (FIFO, after its prefetch)
        queue = _WriteQueue(write_pool)
        for i, (job, rows) in enumerate(items):
            if pending is not None:
                inputs, bad = pending.result()  # its own check ran after paging in
            else:
                while released:
                    released.pop(0).result()  # two big items are never resident at once
                reader.check_unchanged(job)
                inputs = reader.inputs(job, rows)
                bad = nonfinite_inputs(inputs)
            nxt = items[i + 1] if i + 1 < len(items) else None
            # Prefetch overlaps paging in with computing, but two big jobs must not be resident at once.
            small = nxt is not None and (_item_bytes(plan, *nxt) <= PREFETCH_LIMIT
                                         or _item_bytes(plan, job, rows) <= PREFETCH_LIMIT)
            pending = pool.submit(_stage, reader, *nxt) if small else None
            nread = inputs.nbytes
            if observe is not None:
                observe(job, rows, inputs.tensors, bad)
            if bad and not allow_nonfinite:
                raise NonFiniteError(
                    f"input {_described(plan, bad[0])} holds NaN or Inf values, so the merge of {job.name} would be NaN or silently "
                    "wrong; nothing was written. Repair or leave out that checkpoint, or allow non-finite inputs "
                    "(allow_nonfinite=True; --allow-nonfinite), which writes the merge and lists every such tensor")
            nonfinite.extend(d for d in (_described(plan, ref) for ref in bad) if d not in nonfinite)
            out = compute(plan, job, inputs, dev, seed, rows, notes)
            reader.check_unchanged(job)
            del inputs
            while released and released[0].done():
                released.pop(0).result()  # errors surface here
            released.append(pool.submit(reader.release, job, rows))
            queue.put(out.numel() * out.element_size(), _check_and_write, writer, job, rows, out,
                      not bad and not allow_nonfinite)
            del out
            progress.advance(nread, done=rows is None or rows[1] == job.shape[0])
        queue.drain()
        for future in released:
            future.result()
        report = RunReport(
            out_dir=out_dir, tensors=len(plan.jobs),
            merged=sum(1 for j in plan.jobs if not j.copy),
            copied=[(j.name, "; ".join(filter(None, [j.note, *notes.get(j.name, [])]))) for j in plan.jobs
                    if j.copy or j.note or notes.get(j.name)],
            left_out=plan.left_out, bytes_read=plan.bytes_read, bytes_written=plan.bytes_written,
            seconds=time.perf_counter() - start, device=str(dev), nonfinite=nonfinite)
        extra = extra_files_fn(report) if extra_files_fn else None
        if plan.tokenizer_files is not None:  # a rebuilt tokenizer replaces the copied one (MergeKit writes it too)
            extra = {**plan.tokenizer_files, **(extra or {})}
        writer.finish(assets_from=plan.assets_from.folder, config_updates=plan.config_updates,
                      extra_files=extra, copy_tokenizer=copy_tokenizer and plan.tokenizer_files is None,
                      copy_files=copy_files)
    report.seconds = time.perf_counter() - start
    return report


def execute_into(plan: Plan, outputs, *, device: str = "cpu", seed: int | None = None,
                 keep_inputs: bool = False) -> None:
    """Run `plan` into preallocated tensors instead of a checkpoint (in-memory candidates).

    `outputs` maps each output tensor's name to a tensor of its shape (e.g. the
    state dict of a module, whose tensors share the parameters' storage); every
    job's result is copied into it, chunk by chunk as execute() computes it,
    with the same jobs, chunks and generators, so the numbers are those
    execute() writes. A dtype that differs from the job's is converted by copy_.
    keep_inputs: leave the inputs' pages mapped after each job (a search merges the
    same inputs again and again; unmapping them would fault every page in anew).
    """
    dev = resolve_device(device)
    from mergelab.errors import MergeError, ShapeMismatch

    missing = [j.name for j in plan.jobs if j.name not in outputs]
    if missing:
        raise MergeError(f"the in-memory model has no tensor {missing[0]!r} (and {len(missing) - 1} more) that the "
                         "merge produces; build the template model with the checkpoints' architecture")
    for j in plan.jobs:
        if tuple(outputs[j.name].shape) != tuple(j.shape):
            raise ShapeMismatch(f"tensor {j.name} of the merge has shape {tuple(j.shape)}, the in-memory model "
                                f"has {tuple(outputs[j.name].shape)}; build it with the checkpoints' config")
    reader = _Reader(plan.checkpoints)
    with torch.no_grad():
        for job, rows in _work_items(plan):
            out = compute(plan, job, reader.inputs(job, rows), dev, seed, rows)
            if not keep_inputs:
                reader.release(job, rows)
            target = outputs[job.name]
            (target if rows is None else target[rows[0]:rows[1]]).copy_(out)
