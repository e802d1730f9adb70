"""In-memory candidates: a recipe merged straight into a preallocated model, nothing written to disk.

The input checkpoints are opened once (memory-mapped) and shared by every
candidate; each candidate is planned with `mergelab.planner.make_plan` (the recipe
validated as `mergelab merge` does) and written by a search/fastpath.py
CandidateWriter into the tensors of one template module (its state dict shares
the parameters' storage), which the evaluator then uses as it is. The writer
skips tensors whose result the model already holds, runs linear and TIES through
the compiled kernels straight into the model's tensors with what does not depend
on the candidate cached once per search, and hands everything else to
`mergelab.engine.execute_into` (same jobs, chunks and seeded generators as
`mergelab merge`). Evaluation should be the only real cost of a candidate.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mergelab.analysis import evaluators as ev
from mergelab.analysis.eval_setup import StateDictTemplate
from mergelab.checkpoint.reader import Checkpoint
from mergelab.errors import CheckpointError, MergeError
from mergelab.plan import Plan
from mergelab.planner import make_plan
from mergelab.search.fastpath import CandidateWriter, SearchCache
from mergelab.recipe import Recipe, load_recipe, resolve


class CheckpointCache:
    """Checkpoints opened once, by resolved path, for every candidate (thread-safe opening)."""

    def __init__(self) -> None:
        self._open: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()

    def get(self, paths: list[str]) -> dict[str, Checkpoint]:
        """path -> Checkpoint for `paths`, in their order (the plan's model indices follow it)."""
        with self._lock:
            problems = []
            for p in paths:
                if p not in self._open:
                    try:
                        self._open[p] = Checkpoint(p)
                    except CheckpointError as exc:
                        problems.append(str(exc))
            if problems:
                raise CheckpointError("\n".join(problems))
            return {p: self._open[p] for p in paths}

    def close(self) -> None:
        for ck in self._open.values():
            ck.close()
        self._open.clear()


def as_recipe(recipe: Recipe | Mapping | str) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def plan_recipe(recipe: Recipe | Mapping | str, cache: CheckpointCache) -> Plan:
    """The plan `mergelab.merge` would make for `recipe`, over the cached checkpoints."""
    resolved = resolve(as_recipe(recipe))
    return make_plan(resolved.recipe, cache.get(list(resolved.inputs)))


def fit_plan(plan: Plan, sink: Mapping[str, torch.Tensor]) -> tuple[Plan, list[str]]:
    """`plan` restricted to the tensors `sink` holds, and the names left out (not in the model).

    Every tensor of the sink must be produced by the plan, or share its storage with one
    that is (a tied lm_head); otherwise it would keep stale values, which is an error.
    """
    produced = {j.name for j in plan.jobs}
    ptrs = {sink[n].data_ptr() for n in produced if n in sink}
    stale = [n for n, t in sink.items() if n not in produced and t.data_ptr() not in ptrs and t.is_floating_point()]
    if stale:
        raise MergeError(f"the evaluation model has tensor {stale[0]!r} (and {len(stale) - 1} more) that the merge "
                         "does not produce; the template model must have the checkpoints' architecture")
    left_out = [j.name for j in plan.jobs if j.name not in sink]
    if not left_out:
        return plan, []
    return dataclasses.replace(plan, jobs=[j for j in plan.jobs if j.name in sink]), left_out


class InMemoryModel:
    """One preallocated model that candidates are merged into; `module` is what the evaluator gets.

    With an nn.Module template the sink is its state dict (the parameters' own storage).
    With a StateDictTemplate (a user function evaluating state dicts) the sink is a dict of
    tensors allocated once, at the first candidate, with the output's names, shapes and dtypes.
    """

    def __init__(self, template: nn.Module, cache: SearchCache | None = None, *, threads: int | None = None):
        self.module = template
        self._sink: dict[str, torch.Tensor] | None = None
        self.left_out: list[str] = []
        self.writer = CandidateWriter(cache, threads=threads)

    def sink_for(self, plan: Plan) -> dict[str, torch.Tensor]:
        if isinstance(self.module, StateDictTemplate):
            if self._sink is None or set(self._sink) != {j.name for j in plan.jobs}:
                self._sink = {j.name: torch.empty(j.shape, dtype=j.dtype) for j in plan.jobs}
                self.module.tensors = self._sink
                self.writer.forget()
            return self._sink
        if self._sink is None:
            self._sink = dict(self.module.state_dict())
        return self._sink

    def load(self, plan: Plan, *, device: str = "cpu", seed: int | None = None) -> None:
        """Merge `plan` into this model's tensors."""
        sink = self.sink_for(plan)
        fitted, self.left_out = fit_plan(plan, sink)
        self.writer.write(fitted, sink, device=device, seed=seed)


@dataclasses.dataclass
class CandidateEvaluator:
    """Merges a recipe in memory and evaluates it: recipe -> {metric: value}.

    Several templates (copies of one module) let several candidates be evaluated at once
    from threads (concurrent.futures or optuna's n_jobs): each call borrows a free one.
    """

    evaluator: ev.Evaluator
    templates: list[nn.Module]
    device: str = "cpu"
    seed: int | None = None
    refresh_bn: Any = None
    cache: CheckpointCache = dataclasses.field(default_factory=CheckpointCache)
    search_cache: SearchCache = dataclasses.field(default_factory=SearchCache)

    def __post_init__(self) -> None:
        import queue

        self._free: queue.Queue[InMemoryModel] = queue.Queue()
        # One model: its writer merges two tensors at once. Several: the candidates already run at once.
        threads = None if len(self.templates) == 1 else 1
        for t in self.templates:
            self._free.put(InMemoryModel(t, self.search_cache, threads=threads))
        self.left_out: list[str] = []

    @classmethod
    def from_setup(cls, setup: Any, *, workers: int = 1, device: str = "cpu", seed: int | None = None
                   ) -> CandidateEvaluator:
        """From a `mergelab.analysis.eval_setup.Setup`, with `workers` copies of its template."""
        import copy

        templates = [setup.template] + [copy.deepcopy(setup.template) for _ in range(workers - 1)]
        return cls(setup.evaluator, templates, device=device, seed=seed, refresh_bn=setup.refresh_bn)

    def __call__(self, recipe: Mapping | Recipe | str, label: str = "candidate") -> dict[str, float]:
        rec = as_recipe(recipe)
        plan = plan_recipe(rec, self.cache)
        model = self._free.get()
        try:
            model.load(plan, device=self.device, seed=self.seed if self.seed is not None else rec.seed)
            if model.left_out and not self.left_out:
                self.left_out = list(model.left_out)
            if self.refresh_bn is not None:
                model.writer.forget()  # the refresh rewrites normalisation buffers the merge wrote
            ev.refresh_statistics(model.module, self.refresh_bn)
            return ev.evaluate(self.evaluator, model.module, label)
        finally:
            self._free.put(model)

    def close(self) -> None:
        self.cache.close()
        self.search_cache.clear()


def merge_in_memory(recipe: Mapping | Recipe | str, into: nn.Module | Mapping[str, torch.Tensor] | None = None,
                    *, device: str = "cpu", seed: int | None = None, cache: CheckpointCache | None = None,
                    writer: CandidateWriter | None = None) -> dict[str, torch.Tensor]:
    """Merge `recipe` in memory; returns the merged tensors (those of `into` when given).

    Args:
        recipe: a recipe path, YAML text, dict or loaded Recipe.
        into: an nn.Module or a dict of preallocated tensors to write into (None: new tensors).
        seed: seed of randomised methods (None: the recipe's `seed:`), as `mergelab merge --seed`.
        cache: opened checkpoints to reuse across calls.
        writer: a CandidateWriter to reuse across calls into the same `into` (it remembers what
            each tensor holds and keeps the search's caches); None: a fresh one.
    """
    own = cache is None
    cache = cache or CheckpointCache()
    try:
        rec = as_recipe(recipe)
        plan = plan_recipe(rec, cache)
        seed = seed if seed is not None else rec.seed
        if into is None:
            sink = {j.name: torch.empty(j.shape, dtype=j.dtype) for j in plan.jobs}
        else:
            sink = dict(into.state_dict()) if isinstance(into, nn.Module) else dict(into)
        fitted, _ = fit_plan(plan, sink)
        (writer or CandidateWriter()).write(fitted, sink, device=device, seed=seed)
        return sink
    finally:
        if own:
            cache.close()

