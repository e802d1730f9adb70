"""Checks every worker runs before the first sync: same model, same starting point.

The workers' parameter lists (name, shape, dtype) are compared through one
all-gather of a digest; only when digests differ are the lists themselves
gathered, so every rank raises the same error naming the first parameter that
differs, instead of hanging later in a collective of mismatched sizes.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mergelab.distributed.buckets import flatten, make_buckets, unflatten
from mergelab.distributed.comm import Comm
from mergelab.errors import ShapeMismatch


class WorkerMismatch(ShapeMismatch):
    """Workers' models differ in parameter names, shapes, dtypes or count."""


def describe(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(n, tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in model.named_parameters()]


def digest(entries) -> torch.Tensor:
    h = hashlib.sha256(repr(entries).encode()).digest()
    return torch.frombuffer(bytearray(h), dtype=torch.uint8).clone()  # (32,)


def check_same_model(comm: Comm, model: nn.Module) -> None:
    """Raise WorkerMismatch on every rank if any worker's parameters differ from rank 0's."""
    mine = describe(model)
    st = comm.stats
    before = st.payload_bytes, st.wire_bytes, st.calls
    gathered, _ = comm.all_gather(digest(mine))  # (W, 32)
    st.setup_bytes += st.payload_bytes - before[0]  # setup traffic, not sync traffic
    st.payload_bytes, st.wire_bytes, st.calls = before
    if bool((gathered == gathered[0]).all()):
        return
    lists = comm.all_gather_object(mine)
    raise WorkerMismatch(first_difference(lists))


def first_difference(lists) -> str:
    """Message naming the first parameter where some worker differs from worker 0."""
    ref = lists[0]
    for rank, other in enumerate(lists[1:], start=1):
        for i in range(max(len(ref), len(other))):
            a = ref[i] if i < len(ref) else None
            b = other[i] if i < len(other) else None
            if a == b:
                continue
            if a is None:
                what = f"worker {rank} has an extra parameter {b[0]} (shape {b[1]}) at position {i}"
            elif b is None:
                what = f"worker {rank} lacks parameter {a[0]} (shape {a[1]}), worker 0 has it at position {i}"
            elif a[0] != b[0]:
                what = f"parameter {i} is {a[0]} on worker 0 but {b[0]} on worker {rank}"
            else:
                what = (f"parameter {a[0]} has shape {a[1]} dtype {a[2]} on worker 0 but shape {b[1]} "
                        f"dtype {b[2]} on worker {rank}")
            return (f"the workers' models differ: {what} ({len(ref)} parameters on worker 0, {len(other)} on "
                    f"worker {rank}); every worker must build the same model")
    return "the workers' models differ"


@torch.no_grad()
def broadcast_parameters(comm: Comm, model: nn.Module, cap_bytes: int = 25 * 2**20) -> None:
    """Copy rank 0's parameters to every worker, bucketed (as DDP does at construction)."""
    params = [p for _, p in model.named_parameters()]
    for idx in make_buckets(params, cap_bytes):
        flat = flatten([params[i] for i in idx])
        comm.broadcast(flat, src=0)
        for i, v in zip(idx, unflatten(flat, [params[i] for i in idx])):
            params[i].copy_(v)
