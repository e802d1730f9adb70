"""SPARTA: average a small random share of the parameters across workers after every inner step.

After inner step t, every worker draws the same k = max(1, round(fraction * N))
indices into its N parameters (flattened in `named_parameters` order) from a
generator seeded with (seed, t), and sets those entries to their mean over
the workers:

    theta_i[S_t] <- (1/W) sum_j theta_j[S_t]

One all-reduce of k values per step, so fraction = 0.005 sends 0.5% of a
model per step. Indices are drawn with replacement and duplicates dropped (no
O(N) permutation per step), so the share is fraction to within fraction/2;
fraction = 1 takes every index and is plain parameter averaging every step.
Optionally a DiLoCo outer step every `sync_every` steps (pass `outer`).
SPARTA, sparse parameter averaging (Beton, Baioumy, van der Ouderaa, Reed,
Howes, Cheema, Vrabie, 2025, EXO Labs; openreview.net/forum?id=stFPf3gzq1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mergelab.distributed.comm import Comm, TorchComm
from mergelab.distributed.validate import broadcast_parameters, check_same_model


class SPARTA:
    """Average a random `fraction` of the parameters across workers after every inner step.

    Args:
        model, inner: the worker's model and the optimizer the training loop steps.
        fraction: share of the parameters averaged per step, in (0, 1].
        seed: seed of the shared index draw (the same on every worker).
        outer, sync_every, **diloco: if given, also a DiLoCo outer step every sync_every steps.
        group / comm: as for DiLoCo.
    """

    def __init__(self, model: nn.Module, inner: torch.optim.Optimizer, fraction: float = 0.005, *, seed: int = 0,
                 outer: torch.optim.Optimizer | None = None, sync_every: int | None = None, group=None,
                 comm: Comm | None = None, **diloco: Any):
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        if (outer is None) != (sync_every is None):
            raise ValueError("pass both outer= and sync_every= for a DiLoCo outer step, or neither")
        from mergelab.distributed.diloco import DiLoCo, current_comm

        self.model, self.inner, self.fraction, self.seed = model, inner, float(fraction), seed
        self.comm = comm or current_comm() or TorchComm(group)
        self.params = [p for _, p in model.named_parameters()]
        if outer is not None:
            self.diloco: DiLoCo | None = DiLoCo(model, inner, outer, sync_every, comm=self.comm, **diloco)
        else:
            self.diloco = None
            check_same_model(self.comm, model)
            broadcast_parameters(self.comm, model)
        sizes = torch.tensor([p.numel() for p in self.params])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])  # (P + 1,)
        self.numel = int(self.offsets[-1])
        self.k = max(1, round(self.fraction * self.numel))
        self.step = 0
        self._hook = None

    def __enter__(self) -> SPARTA:
        self._hook = self.inner.register_step_post_hook(lambda *_: self.after_inner_step())
        if self.diloco is not None:  # registered after ours: averaging first, then the outer step
            self.diloco.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.diloco is not None:
            self.diloco.__exit__(*exc)
        return False

    @property
    def stats(self):
        return self.comm.stats

    def indices(self, step: int) -> torch.Tensor:
        """Sorted flat indices averaged after inner step `step` (identical on every worker)."""
        if self.fraction >= 1.0:
            return torch.arange(self.numel)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.unique(torch.randint(self.numel, (self.k,), generator=gen))  # sorted

    @torch.no_grad()
    def after_inner_step(self) -> None:
        idx = self.indices(self.step)
        self.step += 1
        bounds = torch.searchsorted(idx, self.offsets).tolist()  # idx[bounds[i]:bounds[i+1]] in param i
        parts = []
        for i, p in enumerate(self.params):
            local = idx[bounds[i]:bounds[i + 1]] - self.offsets[i]
            parts.append(p.detach().reshape(-1)[local.to(p.device)].float())
        vals = torch.cat(parts)
        before = self.comm.stats.payload_bytes, self.comm.stats.wire_bytes
        self.comm.all_reduce_sum(vals)
        self.comm.stats.per_sync.append((self.comm.stats.payload_bytes - before[0],
                                         self.comm.stats.wire_bytes - before[1]))
        vals /= self.comm.world_size
        start = 0
        for i, p in enumerate(self.params):
            n = bounds[i + 1] - bounds[i]
            if n:
                local = (idx[bounds[i]:bounds[i + 1]] - self.offsets[i]).to(p.device)
                p.view(-1)[local] = vals[start:start + n].to(p.dtype)
            start += n
