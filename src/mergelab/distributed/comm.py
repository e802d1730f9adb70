"""The collectives DiLoCo needs, on torch.distributed or on threads of one process.

`TorchComm` wraps a torch.distributed process group (gloo, NCCL). `ThreadComm`
runs the same collectives among threads of one process, which is how
`simulate_workers` gives n-process numbers without n processes: every sum is
taken in rank order, so every thread gets the same bits.

Both count what each worker hands to a collective (`CommStats`): the payload
bytes and the bytes a ring algorithm would send on the wire (all-reduce
2(n-1)/n of the payload, all-gather (n-1) times it, broadcast from the root
once per peer), and the wall time spent inside collectives.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclasses.dataclass
class CommStats:
    """What one worker sent. `per_sync` holds (payload, wire) bytes of each outer/SPARTA sync."""

    payload_bytes: int = 0
    wire_bytes: float = 0.0
    calls: int = 0
    comm_seconds: float = 0.0
    setup_bytes: int = 0
    per_sync: list = dataclasses.field(default_factory=list)

    def add(self, payload: int, wire: float, seconds: float = 0.0) -> None:
        self.payload_bytes += payload
        self.wire_bytes += wire
        self.calls += 1
        self.comm_seconds += seconds

    def as_dict(self) -> dict[str, Any]:
        return {"payload_bytes": self.payload_bytes, "wire_bytes": self.wire_bytes, "calls": self.calls,
                "comm_seconds": self.comm_seconds, "setup_bytes": self.setup_bytes,
                "syncs": len(self.per_sync),
                "peak_sync_payload_bytes": max((p for p, _ in self.per_sync), default=0)}


class Handle:
    """An asynchronous collective; `wait()` blocks until its result is in the tensors given."""

    def __init__(self, work=None, on_done=None, stats: CommStats | None = None):
        self._work, self._on_done, self._stats = work, on_done, stats

    def wait(self) -> None:
        t0 = time.perf_counter()
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._stats is not None:
            self._stats.comm_seconds += time.perf_counter() - t0
        if self._on_done is not None:
            done, self._on_done = self._on_done, None
            done()


class Comm:
    """Interface: rank, world_size, and four collectives that count their bytes."""

    rank: int
    world_size: int
    stats: CommStats

    def _count(self, t: Tensor, factor: float) -> None:
        nbytes = t.numel() * t.element_size()
        self.stats.add(nbytes, nbytes * factor)

    def all_reduce_sum(self, t: Tensor, *, async_op: bool = False) -> Handle:
        raise NotImplementedError

    def all_gather(self, t: Tensor, *, async_op: bool = False) -> tuple[Tensor, Handle]:
        """Returns (out (world, *t.shape), handle); out is valid after handle.wait()."""
        raise NotImplementedError

    def broadcast(self, t: Tensor, src: int = 0) -> None:
        raise NotImplementedError

    def all_gather_object(self, obj: Any) -> list[Any]:
        raise NotImplementedError


class TorchComm(Comm):
    """Collectives of a torch.distributed process group (None: the default group)."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first "
                               "(torchrun sets rank and world size), or use simulate_workers")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats = CommStats()

    def _timed(self, work, async_op: bool) -> Handle:
        handle = Handle(work, stats=self.stats)
        if not async_op:
            handle.wait()
        return handle

    def all_reduce_sum(self, t: Tensor, *, async_op: bool = False) -> Handle:
        self._count(t, 2 * (self.world_size - 1) / self.world_size)
        t0 = time.perf_counter()
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self.stats.comm_seconds += time.perf_counter() - t0
        return self._timed(work, async_op)

    def all_gather(self, t: Tensor, *, async_op: bool = False) -> tuple[Tensor, Handle]:
        self._count(t, self.world_size - 1)
        flat = torch.empty(self.world_size * t.numel(), dtype=t.dtype, device=t.device)
        t0 = time.perf_counter()
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        work = gather(flat, t.contiguous().view(-1), group=self.group, async_op=True)
        self.stats.comm_seconds += time.perf_counter() - t0
        return flat.view(self.world_size, *t.shape), self._timed(work, async_op)

    def broadcast(self, t: Tensor, src: int = 0) -> None:
        t0 = time.perf_counter()
        dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group is not None else src,
                       group=self.group)
        self.stats.comm_seconds += time.perf_counter() - t0
        if self.rank == src:
            self.stats.setup_bytes += t.numel() * t.element_size() * (self.world_size - 1)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


class ThreadHub:
    """Shared state of the n threads of one simulated group."""

    def __init__(self, world_size: int, timeout: float = 600.0):
        self.world_size = world_size
        self.slots: list[Any] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Every thread deposits a value and gets everyone's, in rank order."""
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read
        return out


class ThreadComm(Comm):
    """The collectives among threads (see `simulate_workers`). Sums run in rank order on every
    thread, so all threads hold identical results; asynchronous calls complete at once."""

    def __init__(self, hub: ThreadHub, rank: int):
        self.hub, self.rank, self.world_size = hub, rank, hub.world_size
        self.stats = CommStats()

    def all_reduce_sum(self, t: Tensor, *, async_op: bool = False) -> Handle:
        self._count(t, 2 * (self.world_size - 1) / self.world_size)
        t0 = time.perf_counter()
        parts = self.hub.exchange(self.rank, t.clone())
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        t.copy_(total)
        self.stats.comm_seconds += time.perf_counter() - t0
        return Handle()

    def all_gather(self, t: Tensor, *, async_op: bool = False) -> tuple[Tensor, Handle]:
        self._count(t, self.world_size - 1)
        t0 = time.perf_counter()
        out = torch.stack(self.hub.exchange(self.rank, t.clone()))
        self.stats.comm_seconds += time.perf_counter() - t0
        return out, Handle()

    def broadcast(self, t: Tensor, src: int = 0) -> None:
        parts = self.hub.exchange(self.rank, t.clone() if self.rank == src else None)
        t.copy_(parts[src])
        if self.rank == src:
            self.stats.setup_bytes += t.numel() * t.element_size() * (self.world_size - 1)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.hub.exchange(self.rank, obj)
