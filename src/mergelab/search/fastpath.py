"""Candidate merges that reuse what does not depend on the candidate's parameters.

A search merges the same inputs hundreds of times with other weights and densities.
Per search (SearchCache, shared by every preallocated model and worker thread):

- input checks: each input tensor is checked for NaN/Inf once (as `mergelab merge`
  refuses such inputs), not at every candidate; each input file is checked unchanged
  (one stat) at every candidate;
- input views: each input tensor is viewed (memory-mapped) once;
- kernels' prepared state (SearchCache.keeper): what a registered kernel's `prepare` makes
  from the inputs alone, once per search within a memory budget; for TIES, each task vector's
  magnitude order (methods/kernels/ties_order.py), which turns the exact top-k selection of
  any density into two reads.

Per preallocated model (CandidateWriter): each candidate is one engine.run(plan, CandidateSink),
the engine's one loop, with the sink's hooks:

- select: a tensor whose job (method, inputs, parameters, dtype, and seed for randomised
  methods) equals the one whose result the model already holds is skipped;
- direct: a job whose method's registered kernel has an `into` entry (linear, task arithmetic,
  ties today; methods/kernels/__init__.py's Kernel) is written by it straight into the
  model's tensor (no temporary output, no copy), with its prepared state;
- these passes run in the engine's lanes (engine/lanes.py), two at once (`threads`), each
  tensor on one thread, the biggest tensors first, each to the less loaded lane: most
  tensors of a model are too small for a parallel loop to pay for waking its threads;
- everything else (other methods, randomised ones, vocabulary resizing, statistics, GPU)
  the engine's loop computes and the sink copies in (MemorySink.write), inputs kept mapped.

A kernel's `into` runs where its `supports_into` (else `supports`) accepts the inputs: where
`run_method` would pick the kernel, or, for TIES, at every size, as its kernel does the
reference's float32 operations in the reference's order (where `mergelab merge` runs the
readable reference, on tensors below the kernel's minimum size, the numbers are the same).
So the model holds the numbers `mergelab merge` writes, bit for bit
(tests/search/test_candidate.py, tests/methods/test_ties_into.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, MutableMapping

import torch

from mergelab.engine.lanes import Task
from mergelab.engine.sinks import MemorySink
from mergelab.errors import NonFiniteError
from mergelab.plan import Job, Plan, TensorRef

def default_cache_bytes() -> int:
    """A quarter of the memory available now (Linux's MemAvailable: free plus reclaimable cache), else 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


@dataclasses.dataclass
class CacheStats:
    """What kernels' prepare steps stored (for TIES: one magnitude order per trimmed task vector)."""

    indexes: int = 0  # states built
    index_bytes: int = 0
    index_seconds: float = 0.0
    over_budget: int = 0  # states not built: the budget was spent


class SearchCache:
    """What every candidate of one search shares: checked inputs, input views, kernels' prepared state."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget = default_cache_bytes() if budget_bytes is None else budget_bytes
        self.stats = CacheStats()
        self._checked: set[tuple[str, str]] = set()
        self._prepared: dict[tuple, object] = {}  # kernels' prepared state (keeper)
        self._views: dict[tuple[int, str], tuple[object, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def check_inputs(self, plan: Plan) -> None:
        """Every input file unchanged since it was opened (one stat each), and NonFiniteError for the
        first input holding NaN/Inf (each input scanned once per search)."""
        from mergelab.methods.kernels import has_nonfinite

        for ck in {id(ck): ck for ck in plan.checkpoints}.values():
            ck.check_unchanged()  # the views kept below are read again at every candidate
        for job in plan.jobs:
            for ref in job.refs():
                ck = plan.checkpoints[ref.model]
                key = (str(ck.path), ref.name)
                if key in self._checked:
                    continue
                if has_nonfinite(ck.view(ref.name)):
                    raise NonFiniteError(f"input {ref.name} ({ck.path}) holds NaN or Inf values, so every "
                                         "candidate merging it would be NaN or silently wrong; repair or leave "
                                         "out that checkpoint")
                with self._lock:
                    self._checked.add(key)

    @property
    def checked(self) -> frozenset[tuple[str, str]]:
        """(checkpoint path, tensor name) of every input scanned finite so far."""
        with self._lock:
            return frozenset(self._checked)

    def view(self, plan: Plan, ref: TensorRef) -> torch.Tensor:
        """The input tensor `ref` as a view of its file, made once per opened checkpoint."""
        ck = plan.checkpoints[ref.model]
        key = (id(ck), ref.name)
        held = self._views.get(key)
        if held is None or held[0] is not ck:
            held = (ck, ck.view(ref.name))  # the checkpoint is kept with it, so its id is not reused
            with self._lock:
                self._views[key] = held
        return held[1]

    def keeper(self, plan: Plan, job: Job) -> Callable[[int, Callable[[], object], int], object | None]:
        """A kernel's prepare store for `job`: keep(i, build, nbytes) -> build() for input i over the
        job's base, made once per search (one build at a time), or None when nbytes do not fit the budget."""
        spec = plan.method.name

        def keep(i: int, build: Callable[[], object], nbytes: int) -> object | None:
            ref, base = job.inputs[i], job.base
            key = (spec, str(plan.checkpoints[ref.model].path), ref.name,
                   *((str(plan.checkpoints[base.model].path), base.name) if base is not None else ()))
            with self._lock:  # builds happen once, lookups never wait long
                if key in self._prepared:
                    return self._prepared[key]
                if self.stats.index_bytes + nbytes > self.budget:
                    self.stats.over_budget += 1
                    self._prepared[key] = None
                    return None
                t0 = time.perf_counter()
                value = build()
                self.stats.indexes += 1
                self.stats.index_bytes += nbytes
                self.stats.index_seconds += time.perf_counter() - t0
                self._prepared[key] = value
                return value

        return keep

    def clear(self) -> None:
        with self._lock:
            self._prepared.clear()
            self._checked.clear()
            self._views.clear()
            self.stats = CacheStats()


def job_signature(plan: Plan, job: Job, seed: int | None) -> tuple:
    """Everything a job's result depends on: equal signatures give bit-identical tensors."""

    def where(ref: TensorRef | None):
        return None if ref is None else (str(plan.checkpoints[ref.model].path), ref.name)

    spec = plan.method
    # Parameter models are frozen and compare by type and values: they go in as they are.
    return (spec.name, str(plan.compute_dtype), str(job.dtype), tuple(job.shape), job.copy,
            tuple(where(r) for r in job.inputs), where(job.base), job.model_params,
            job.shared, job.vocab_rows, where(job.vocab_fill),
            tuple(where(r) for r in job.stats or ()), where(job.base_stats), seed if spec.randomized else None)


class CandidateWriter:
    """Merges plans into one set of preallocated tensors (a model's state dict), reusing the SearchCache.

    threads: how many tensors are merged at once (each on one thread; None: up to two, the
    cores there are). Give 1 when several writers run at once (a search with several workers).
    """

    def __init__(self, cache: SearchCache | None = None, *, threads: int | None = None):
        self.cache = cache or SearchCache()
        self.threads = max(1, threads if threads is not None else min(2, os.cpu_count() or 1))
        self.held: dict[str, tuple] = {}  # tensor name -> signature of the result it holds
        self.counts = {"skipped": 0, "fast": 0, "engine": 0}

    def forget(self) -> None:
        """Forget what the tensors hold (call after anything but this writer changed them)."""
        self.held.clear()

    def write(self, plan: Plan, sink: MutableMapping[str, torch.Tensor], *, device: str = "cpu",
              seed: int | None = None) -> None:
        """Merge `plan` (whose jobs all name tensors of `sink`) into `sink`: one engine run into a CandidateSink."""
        from mergelab.engine import run

        self.cache.check_inputs(plan)  # the engine need not scan the inputs again: known_finite
        run(plan, CandidateSink(self, sink, seed), device=device, seed=seed)


class CandidateSink(MemorySink):
    """A CandidateWriter's tensors as the engine's sink, for one candidate.

    select: the jobs whose result the tensors do not hold already (by job_signature); tensors
    whose memory overlaps (a tied lm_head, views of one buffer) hold what the last job wrote, so
    none of them is skipped unless all agree, and they go through the engine's loop in plan order.
    direct: a job whose method's kernel has `into` is written by it straight into its tensor, in
    the engine's lanes (the writer's threads), from the search's cached views and prepared state.
    Everything else (other methods, randomised ones, vocabulary resizing, statistics, GPU) the
    engine's loop computes and write() copies in, with the inputs kept mapped between candidates.
    """

    def __init__(self, writer: CandidateWriter, tensors: MutableMapping[str, torch.Tensor], seed: int | None):
        super().__init__(tensors, keep_inputs=True, known_finite=writer.cache.checked)
        self.writer, self.seed, self.lanes = writer, seed, writer.threads
        self.sigs: dict[str, tuple] = {}
        self.todo: list[Job] = []
        self.alone: set[str] = set()  # tensors whose memory no other job's tensor overlaps
        self.fast = 0

    def select(self, plan: Plan) -> list[Job]:
        held, counts = self.writer.held, self.writer.counts
        self.sigs = {job.name: job_signature(plan, job, self.seed) for job in plan.jobs}
        group = memory_groups({j.name: self.tensors[j.name] for j in plan.jobs})
        changed = {group[j.name] for j in plan.jobs if held.get(j.name) != self.sigs[j.name]}
        todo = [j for j in plan.jobs if group[j.name] in changed]
        counts["skipped"] += len(plan.jobs) - len(todo)
        for job in todo:
            held.pop(job.name, None)  # unknown until written
        sizes = Counter(group.values())
        self.alone = {j.name for j in todo if sizes[group[j.name]] == 1}
        self.todo = todo
        return todo

    def direct(self, plan: Plan, job: Job, device: torch.device) -> Task | None:
        if device.type != "cpu" or job.name not in self.alone:
            return None
        task = direct_task(plan, job, self.tensors[job.name], self.writer.cache)
        self.fast += task is not None
        return task

    def finish(self, plan: Plan, report) -> None:
        counts = self.writer.counts
        counts["fast"] += self.fast
        counts["engine"] += len(self.todo) - self.fast
        for job in self.todo:
            self.writer.held[job.name] = self.sigs[job.name]


def direct_task(plan: Plan, job: Job, target: torch.Tensor, cache: SearchCache) -> Task | None:
    """`job` as a task that writes `target` through its kernel's `into`, or None where none applies.

    Any method whose registered kernel has `into` (methods/kernels/__init__.py's Kernel) and accepts
    these inputs (`supports_into`, else `supports`: where `mergelab merge` runs the kernel, or
    where the kernel's numbers equal the reference's); its `prepare` state is kept per search.
    """
    from mergelab.methods import PerModel
    from mergelab.methods.kernels import kernels_enabled

    spec = plan.method
    if (spec.kernel is None or job.op != "merge" or job.copy or job.vocab_rows is not None or job.vocab is not None
            or job.stats or job.base_stats is not None or spec.needs_stats or spec.randomized
            or not kernels_enabled() or plan.compute_dtype != torch.float32):
        return None  # randomised methods draw per engine chunk: the engine keeps their generators
    if target.dtype != job.dtype or job.dtype not in (torch.float32, torch.bfloat16) \
            or not target.is_contiguous() or target.device.type != "cpu":
        return None
    into = spec.kernel.entry("into")
    if into is None:
        return None
    xs = [cache.view(plan, r) for r in job.inputs]
    base = cache.view(plan, job.base) if job.base is not None else None
    p, s = PerModel(job.model_params), job.shared
    if not (spec.kernel.entry("supports_into") or spec.kernel.supports)(xs, base, p, s):
        return None
    prepare, state = spec.kernel.entry("prepare"), None
    if prepare is not None:
        state = prepare(xs, base, p, s, cache.keeper(plan, job))
        if state is None:
            return None  # over the memory budget: the engine's kernel runs
    cost = target.numel() * (len(xs) + 1 + (base is not None))  # entries read and written
    return Task(cost, functools.partial(into, xs, base, p, s, target, state))


def memory_groups(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """name -> group: tensors whose memory overlaps (shared storage, overlapping views) share a group.

    A contiguous tensor spans its own bytes; any other is taken to span its whole storage.
    Tensors on different devices never share a group (their address spaces are apart).
    """
    spans = []
    for name, t in tensors.items():
        if t.is_contiguous():
            start = t.data_ptr()
            stop = start + t.numel() * t.element_size()
        else:
            start = t.untyped_storage().data_ptr()
            stop = start + t.untyped_storage().nbytes()
        spans.append((str(t.device), start, max(stop, start + 1), name))  # empty: one byte, its own
    spans.sort()
    out, gid, reach, where = {}, -1, -1, None
    for device, start, stop, name in spans:
        if device != where or start >= reach:
            gid, reach, where = gid + 1, stop, device
        else:
            reach = max(reach, stop)
        out[name] = gid
    return out
