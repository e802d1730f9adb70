"""The sync schedule every inner-step-driven method shares, with plain parameter averaging as its sync.

LocalSGD (Stich, 2019, arXiv:1805.09767; torchft's LocalSGD): each worker takes `sync_every` inner
optimizer steps alone, then every worker's parameters are set to their mean over the workers:

    theta_i <- (1/W) sum_j theta_j

The model may be cut into F fragments that take turns (fragment k syncs after every H/F inner steps,
in order), and a fragment's sync may be prepared `fragment_sync_delay` steps before it is applied.
A subclass changes what a sync does by overriding `prepare_sync(k)` (start fragment k's reduction)
and `perform_sync(k)` (apply it): DiLoCo (diloco.py) steps an outer optimizer with the
pseudo-gradient instead, as torchft's DiLoCo overrides LocalSGD's sync.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.distributed.comm import Comm, TorchComm
from mergelab.distributed.config import DiLoCoConfig
from mergelab.distributed.validate import broadcast_parameters, check_same_model


def current_comm() -> Comm | None:
    """The simulated group of this thread (set by simulate_workers), if any."""
    from mergelab.distributed.simulate import thread_comm

    return thread_comm()


class LocalSGD:
    """Average a model's parameters among workers every `sync_every` inner steps (see module doc).

    Args:
        model: the worker's model; every worker's must have the same parameter names and shapes.
        inner: the optimizer the training loop steps; its step hooks drive the syncs.
        sync_every: H, inner steps between syncs of a fragment.
        model_fragments: modules of `model` or lists of its parameters, covering each parameter
            once; None: the whole model is one fragment.
        fragment_sync_delay: inner steps between preparing a fragment's sync and applying it.
        group: torch.distributed process group (default: the world); comm: a Comm to use instead.
    """

    def __init__(self, model: nn.Module, inner: torch.optim.Optimizer, sync_every: int, *,
                 model_fragments: Sequence[nn.Module | Sequence[Tensor]] | None = None,
                 fragment_sync_delay: int = 0, group=None, comm: Comm | None = None):
        config = DiLoCoConfig(sync_every=sync_every, fragment_sync_delay=fragment_sync_delay)
        self._setup(model, inner, config, model_fragments, comm or current_comm() or TorchComm(group))

    def _setup(self, model: nn.Module, inner: torch.optim.Optimizer, config: DiLoCoConfig,
               model_fragments, comm: Comm, *, connect: bool = True, before_connect=None) -> None:
        """The schedule's state; `connect`: check the workers' models alike and broadcast rank 0's
        parameters (a torchft manager heals replicas itself); `before_connect(comm)` runs first."""
        fragments = list(model_fragments) if model_fragments else [model]
        self.config = config
        self.per, self.delay = config.steps_per_fragment(len(fragments)), config.fragment_sync_delay
        self.model, self.inner, self.comm = model, inner, comm
        if before_connect is not None:
            before_connect(comm)
        if connect:
            check_same_model(comm, model)
            broadcast_parameters(comm, model)
        self.fragments = fragment_params(fragments, {id(p): n for n, p in model.named_parameters()})
        self.local_step = 0
        self.syncs = 0  # fragment syncs applied
        self._hooks: list = []
        self._t_enter: float | None = None
        self.wall_seconds = 0.0
        self._comm_inside = 0.0  # communication seconds while inside the context (not the setup's)
        self._comm_at_enter = 0.0

    # -- context manager ---------------------------------------------------------------
    def __enter__(self):
        self._hooks.append(self.inner.register_step_post_hook(lambda *_: self.after_inner_step()))
        self._t_enter = time.perf_counter()
        self._comm_at_enter = self.comm.stats.comm_seconds - self._comm_inside
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._t_enter is not None:
            self._comm_inside = self.comm.stats.comm_seconds - self._comm_at_enter
            self.wall_seconds += time.perf_counter() - self._t_enter
            self._t_enter = None
        return False

    @property
    def stats(self):
        """CommStats of this worker (bytes, calls, seconds in communication)."""
        return self.comm.stats

    def report(self) -> dict[str, Any]:
        """Bytes sent and time split: communication vs the rest (compute)."""
        wall = self.wall_seconds + (time.perf_counter() - self._t_enter if self._t_enter else 0.0)
        d = self.comm.stats.as_dict()
        d["comm_seconds"] = (self.comm.stats.comm_seconds - self._comm_at_enter if self._t_enter
                             else self._comm_inside)
        d.update(wall_seconds=wall, compute_seconds=wall - d["comm_seconds"], syncs=self.syncs,
                 world_size=self.comm.world_size)
        return d

    # -- the schedule --------------------------------------------------------------------
    def current_fragment(self) -> int:
        return self.syncs % len(self.fragments)

    def after_inner_step(self) -> None:
        self.local_step += 1
        if self.local_step == self.per - self.delay:
            self.prepare_sync(self.current_fragment())
        if self.local_step == self.per:
            self.perform_sync(self.current_fragment())
            self.local_step = 0

    # -- the sync strategy (what subclasses override) ---------------------------------------
    def prepare_sync(self, k: int) -> None:
        """Start fragment k's reduction (`fragment_sync_delay` steps before it is applied)."""

    @torch.no_grad()
    def perform_sync(self, k: int) -> None:
        """Set fragment k's parameters to their mean over the workers."""
        before = self.comm.stats.payload_bytes, self.comm.stats.wire_bytes
        for _, p in self.fragments[k]:
            mean = p.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32).clone()
            self.comm.all_reduce_sum(mean)
            p.copy_(mean / self.comm.world_size)
        self.comm.stats.per_sync.append((self.comm.stats.payload_bytes - before[0],
                                         self.comm.stats.wire_bytes - before[1]))
        self.syncs += 1


def fragment_params(fragments: Sequence[Any], names: Mapping[int, str]) -> list[list[tuple[str, Tensor]]]:
    """Each fragment's (name, parameter) pairs; every parameter of the model in exactly one fragment."""
    out, seen = [], {}
    for k, frag in enumerate(fragments):
        params = []
        for p in (frag.parameters() if isinstance(frag, nn.Module) else frag):
            if id(p) not in names:
                raise ValueError(f"model_fragments[{k}] holds a parameter that is not in the model")
            if id(p) in seen:
                raise ValueError(f"parameter {names[id(p)]} is in model_fragments[{seen[id(p)]}] and [{k}]; "
                                 "every parameter belongs to one fragment")
            seen[id(p)] = k
            params.append((names[id(p)], p))
        if not params:
            raise ValueError(f"model_fragments[{k}] has no parameters")
        out.append(params)
    missing = [n for i, n in names.items() if i not in seen]
    if missing:
        raise ValueError(f"parameter {missing[0]} is in no fragment; the fragments must cover the model")
    return out
