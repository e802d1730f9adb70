"""Fault tolerance through torchft: a worker that dies does not stop the others.

mergelab does not run a quorum protocol of its own. With `DiLoCo(..., manager=m)`
(m a `torchft.manager.Manager`, one per replica group, coordinated by a
`torchft.coordination.LighthouseServer`), every sync asks torchft for a quorum
of the live replicas, all-reduces through the manager (a failed all-reduce
makes `should_commit()` false on every replica, so the step is discarded and
the global model is restored), and registers the DiLoCo state (global
parameters, outer optimizer, sync count) with the manager, so a restarted
replica is healed from a live peer at its first quorum and continues with the
current global model and outer state. torchft 0.2.0 (Liang et al., PyTorch,
https://github.com/pytorch/torchft) runs on CPU with gloo.

Only the plain mean travels through the manager (it offers all-reduce, not
all-gather): outer_merge other than "mean" and quantize other than "none" are
refused with a manager.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from mergelab.distributed.comm import Comm, CommStats, Handle

STATE_KEY = "mergelab_diloco"


class TorchFTComm(Comm):
    """The collectives of a torchft Manager: rank and size are those of the current quorum."""

    def __init__(self, manager):
        self.manager = manager
        self.stats = CommStats()

    @property
    def world_size(self) -> int:
        return max(1, self.manager.num_participants())

    @property
    def rank(self) -> int | None:  # None while this replica heals (it sends zeros)
        return self.manager.participating_rank()

    def begin_sync(self) -> None:
        self.manager.start_quorum()

    def all_reduce_sum(self, t: Tensor, *, async_op: bool = False) -> Handle:
        from torch.distributed import ReduceOp

        n = self.world_size
        self._count(t, 2 * (n - 1) / n)
        t0 = time.perf_counter()
        work = self.manager.allreduce(t, reduce_op=ReduceOp.SUM)
        self.stats.comm_seconds += time.perf_counter() - t0
        handle = Handle(work, stats=self.stats)
        if not async_op:
            handle.wait()
        return handle

    def should_commit(self) -> bool:
        return bool(self.manager.should_commit())

    def current_step(self) -> int:
        return int(self.manager.current_step())


def _compact(obj: Any) -> Any:
    """obj with every tensor replaced by a contiguous copy of its own."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _compact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_compact(v) for v in obj)
    return obj


def register_state(diloco, manager) -> None:
    """Let torchft send this replica's DiLoCo state to a healing peer, and load a peer's."""

    def save() -> dict[str, Any]:
        # compact copies: the backups and SGD's momentum are views of flat buffers (flat.py), and a
        # view sent on its own could carry its whole flat buffer with it
        return _compact({"backup": [[b.detach().cpu() for b in frag] for frag in diloco.backup],
                         "outer": diloco._outer_state(), "syncs": diloco.syncs, "skipped": diloco.skipped})

    def load(state: dict[str, Any]) -> None:
        with torch.no_grad():
            for frag, backups, saved in zip(diloco.fragments, diloco.backup, state["backup"]):
                for (_, p), b, s in zip(frag, backups, saved):
                    b.copy_(s)
                    p.copy_(s)  # continue from the global model
        outers = diloco._distinct_outers()
        if len(outers) == 1:
            outers[0].load_state_dict(state["outer"])
        else:
            for o, st in zip(outers, state["outer"]["per_fragment"]):
                o.load_state_dict(st)
        # healing happens inside a sync (start_quorum): the inner step count stays where it is
        diloco.syncs, diloco.skipped = int(state["syncs"]), int(state["skipped"])
        diloco.healed += 1

    manager.register_state_dict_fn(STATE_KEY, load, save)
