"""Candidate merges that reuse what does not depend on the candidate's parameters.

A search merges the same inputs hundreds of times with other weights and densities.
Per search (SearchCache, shared by every preallocated model and worker thread):

- input checks: each input tensor is checked for NaN/Inf once (as `mergelab merge`
  refuses such inputs), not at every candidate;
- TIES magnitude orders (search/magnitude.py): built once per task vector, they turn the
  exact top-k selection of any density into two reads, within a memory budget.

Per preallocated model (CandidateWriter):

- a tensor whose job (method, inputs, parameters, dtype, and seed for randomised
  methods) equals the one whose result the model already holds is skipped;
- linear: the compiled weighted sum writes straight into the model's tensor (no
  temporary output, no copy);
- ties: each model's threshold and tie cut-off are two reads of its magnitude order, then
  one fused compiled pass (search/ties_kernel.py) writes straight into the model's tensor;
- everything else (other methods, TIES tensors small enough that `mergelab merge`
  runs the readable reference, vocabulary resizing, statistics, GPU) runs through
  engine.execute_into, the engine's own path.

The fast paths run exactly where `run_method` would pick the compiled kernel (the
kernel's own `supports`), linear through that kernel's code, TIES through a pass that
does the reference's float32 operations in its order, so the model holds the numbers
`mergelab merge` writes, bit for bit (tests/search/test_candidate.py, test_ties_kernel.py).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import MutableMapping

import numpy as np
import torch

from mergelab.errors import NonFiniteError
from mergelab.plan import Job, Plan, TensorRef

_FAST_METHODS = ("linear", "ties")
# Entries per thread below which a compiled pass runs on fewer threads: starting and joining a
# parallel region costs tens of microseconds on an idle machine, and a scheduling slice when the
# cores are shared (on the loaded 2-core development machine a 600k-entry pass took 26 ms on two
# threads and 2.6 ms on one). Most tensors of a small model are far below this.
ENTRIES_PER_THREAD = 1 << 20


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
    indexes: int = 0
    index_bytes: int = 0
    index_seconds: float = 0.0
    over_budget: int = 0  # task vectors left unindexed: the budget was spent


class SearchCache:
    """What every candidate of one search shares: checked inputs and TIES magnitude indexes."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget = default_cache_bytes() if budget_bytes is None else budget_bytes
        self.stats = CacheStats()
        self._checked: set[tuple[str, str]] = set()
        self._indexes: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def check_inputs(self, plan: Plan) -> None:
        """NonFiniteError for the first input holding NaN/Inf (each input checked once per search)."""
        from mergelab.methods.kernels import has_nonfinite

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

    def index(self, plan: Plan, ref: TensorRef, base: TensorRef, x: torch.Tensor, b: torch.Tensor):
        """The MagnitudeIndex (keeping order) of |x - b|, built on first use; None when the budget does not allow it."""
        from mergelab.search.magnitude import MagnitudeIndex

        key = (str(plan.checkpoints[ref.model].path), ref.name, str(plan.checkpoints[base.model].path), base.name)
        with self._lock:  # one build at a time: builds happen once, lookups never wait long
            if key in self._indexes:
                return self._indexes[key]
            need = MagnitudeIndex.nbytes_for(b.numel())
            if b.numel() >= 2**31 or self.stats.index_bytes + need > self.budget:
                self.stats.over_budget += 1
                self._indexes[key] = None
                return None
            t0 = time.perf_counter()
            idx = MagnitudeIndex.build(x, b)
            self.stats.indexes += 1
            self.stats.index_bytes += idx.nbytes
            self.stats.index_seconds += time.perf_counter() - t0
            self._indexes[key] = idx
            return idx

    def clear(self) -> None:
        with self._lock:
            self._indexes.clear()
            self._checked.clear()
            self.stats = CacheStats()


def job_signature(plan: Plan, job: Job, seed: int | None) -> tuple:
    """Everything a job's result depends on: equal signatures give bit-identical tensors."""

    def where(ref: TensorRef | None):
        return None if ref is None else (str(plan.checkpoints[ref.model].path), ref.name)

    def params(p) -> tuple | None:
        return None if p is None else tuple(sorted(p.model_dump().items()))

    spec = plan.recipe.method
    return (spec.name, str(plan.recipe.compute_dtype), str(job.dtype), tuple(job.shape), job.copy,
            tuple(where(r) for r in job.inputs), where(job.base), tuple(params(p) for p in job.model_params),
            params(job.shared), job.vocab_rows, where(job.vocab_fill),
            tuple(where(r) for r in job.stats or ()), where(job.base_stats), seed if spec.randomized else None)


class CandidateWriter:
    """Merges plans into one set of preallocated tensors (a model's state dict), reusing the SearchCache."""

    def __init__(self, cache: SearchCache | None = None):
        self.cache = cache or SearchCache()
        self._held: dict[str, tuple] = {}  # tensor name -> signature of the result it holds
        self.counts = {"skipped": 0, "fast": 0, "engine": 0}

    def forget(self) -> None:
        """Forget what the tensors hold (call after anything but this writer changed them)."""
        self._held.clear()

    def write(self, plan: Plan, sink: MutableMapping[str, torch.Tensor], *, device: str = "cpu",
              seed: int | None = None) -> None:
        """Merge `plan` (whose jobs all name tensors of `sink`) into `sink`."""
        from mergelab.engine import execute_into

        self.cache.check_inputs(plan)
        sigs = {job.name: job_signature(plan, job, seed) for job in plan.jobs}
        # Tensors sharing storage (a tied lm_head) hold the last job's result: skip none of them unless all agree.
        changed_storage = {sink[j.name].data_ptr() for j in plan.jobs if self._held.get(j.name) != sigs[j.name]}
        todo = [j for j in plan.jobs if sink[j.name].data_ptr() in changed_storage]
        self.counts["skipped"] += len(plan.jobs) - len(todo)
        for name in [j.name for j in todo]:
            self._held.pop(name, None)  # unknown until written
        on_cpu = torch.device(device).type == "cpu"
        ptrs = [sink[j.name].data_ptr() for j in todo]
        shared = {p for p, c in Counter(ptrs).items() if c > 1}  # written in plan order by the engine, last one wins
        rest = []
        for job, ptr in zip(todo, ptrs):
            if on_cpu and ptr not in shared and self._fast(plan, job, sink[job.name]):
                self.counts["fast"] += 1
                self._held[job.name] = sigs[job.name]
            else:
                rest.append(job)
        if rest:
            # The engine's path; inputs stay mapped between candidates.
            execute_into(dataclasses.replace(plan, jobs=rest), sink, device=device, seed=seed, keep_inputs=True)
            self.counts["engine"] += len(rest)
            for job in rest:
                self._held[job.name] = sigs[job.name]

    def _fast(self, plan: Plan, job: Job, target: torch.Tensor) -> bool:
        """Run `job` into `target` by a fast path if one applies (exactly where run_method picks the kernel)."""
        from mergelab.methods import PerModel
        from mergelab.methods.kernels import at_most_threads, kernels_enabled

        spec = plan.recipe.method
        if (spec.name not in _FAST_METHODS or job.copy or job.vocab_rows is not None or job.stats
                or job.base_stats is not None or spec.needs_stats or not kernels_enabled()
                or plan.recipe.compute_dtype != torch.float32 or spec.kernel is None):
            return False
        if target.dtype != job.dtype or job.dtype not in (torch.float32, torch.bfloat16) \
                or not target.is_contiguous() or target.device.type != "cpu":
            return False
        xs = [plan.checkpoints[r.model].view(r.name) for r in job.inputs]
        base = plan.checkpoints[job.base.model].view(job.base.name) if job.base is not None else None
        p = PerModel(job.model_params)
        if not spec.kernel.supports(xs, base, p, job.shared):
            return False  # merge runs the readable reference here: so must we
        if spec.name == "linear":
            return self._linear(xs, p, job, target)  # the linear kernel runs on one thread
        with at_most_threads(target.numel() // ENTRIES_PER_THREAD):
            return self._ties(plan, job, xs, base, p, target)

    @staticmethod
    def _linear(xs, p, job: Job, target: torch.Tensor) -> bool:
        from mergelab.methods.kernels.linear import weighted_sum
        from mergelab.methods.linear import linear_weights

        weighted_sum(xs, linear_weights(p, job.shared), out=target)
        return True

    def _ties(self, plan: Plan, job: Job, xs, base, p, target: torch.Tensor) -> bool:
        from mergelab.methods.sparsify import keep_count
        from mergelab.search.ties_kernel import ties_into

        n = base.numel()
        thresholds = np.zeros(len(xs), dtype=np.float32)  # threshold 0, cut-off n: every entry kept
        cutoffs = np.full(len(xs), n, dtype=np.int64)
        for i, (ref, q) in enumerate(zip(job.inputs, p)):
            k = n if q.density >= 1 else keep_count(q.density, n)  # as the kernel's run()
            if k >= n:
                continue
            idx = self.cache.index(plan, ref, job.base, xs[i], base)
            if idx is None:
                return False  # over the memory budget: the engine's kernel selects
            thresholds[i], cutoffs[i] = idx.select(k, xs[i], base)
        ties_into(xs, base, thresholds, cutoffs, [float(q.weight) for q in p], normalize=job.shared.normalize,
                  lam=job.shared.lambda_, out=target)
        return True
