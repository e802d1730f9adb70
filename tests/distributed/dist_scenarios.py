"""Worker functions shared by the multi-process (gloo) runs and simulate_workers, and the launcher.

Every scenario is fn(rank, n) -> dict of results; it builds its model and data
without global randomness (threads of simulate_workers share torch's RNG).
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

W0 = [0.1, -0.2, 0.3]
LINEAR = dict(lr=0.1, H=3, syncs=4, outer_lr=0.7, momentum=0.9)
NAN_AT_SYNC = 1  # rank 1 sees NaN data during the inner steps of this sync (0-based)


def linear_data(rank: int, nan_sync: int | None = None, step: int = 0):
    """Per-rank data of the hand-worked linear model: X (4, 3), y (4, 1), float64, no RNG."""
    i = torch.arange(12, dtype=torch.float64).view(4, 3)
    X = torch.cos(i * (rank + 1) * 0.37)
    y = torch.sin(torch.arange(4, dtype=torch.float64) * (rank + 2) * 0.51).view(4, 1)
    if nan_sync is not None and rank == 1 and step // LINEAR["H"] == nan_sync:
        X = X.clone()
        X[0, 0] = float("nan")
    return X, y


def linear_model() -> nn.Module:
    m = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([W0], dtype=torch.float64))
    return m


def mlp(seed: int = 0) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return m


def mlp_data(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randn(16, 2, generator=gen,
                                                                               dtype=torch.float64)


def run_linear(rank: int, n: int, nan_sync: int | None = None) -> dict:
    from mergelab.distributed import DiLoCo

    m = linear_model()
    inner = torch.optim.SGD(m.parameters(), lr=LINEAR["lr"])
    outer = torch.optim.SGD(m.parameters(), lr=LINEAR["outer_lr"], momentum=LINEAR["momentum"], nesterov=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with DiLoCo(m, inner, outer, sync_every=LINEAR["H"]) as d:
            for step in range(LINEAR["H"] * LINEAR["syncs"]):
                X, y = linear_data(rank, nan_sync, step)
                inner.zero_grad()
                ((m(X) - y) ** 2).mean().backward()
                inner.step()
    return {"w": m.weight.detach().clone(), "report": d.report(), "per_sync": list(d.stats.per_sync),
            "warnings": [str(w.message) for w in caught]}


def run_sync1(rank: int, n: int, steps: int = 5) -> dict:
    """DiLoCo sync_every=1 with outer SGD(lr=1), and DDP on the same data when in processes."""
    from mergelab.distributed import DiLoCo

    m = mlp()
    X, y = mlp_data(rank)
    inner = torch.optim.SGD(m.parameters(), lr=0.05)
    outer = torch.optim.SGD(m.parameters(), lr=1.0)
    with DiLoCo(m, inner, outer, sync_every=1):
        for _ in range(steps):
            inner.zero_grad()
            ((m(X) - y) ** 2).mean().backward()
            inner.step()
    out = {"diloco": [p.detach().clone() for p in m.parameters()]}
    import torch.distributed as dist

    if dist.is_initialized():  # torch's own DistributedDataParallel, an independent reference
        ref = mlp()
        ddp = nn.parallel.DistributedDataParallel(ref)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            ((ddp(X) - y) ** 2).mean().backward()
            opt.step()
        out["ddp"] = [p.detach().clone() for p in ref.parameters()]
    return out


def run_sparta_full(rank: int, n: int, steps: int = 4) -> dict:
    from mergelab.distributed import SPARTA

    m = linear_model()
    inner = torch.optim.SGD(m.parameters(), lr=LINEAR["lr"])
    with SPARTA(m, inner, fraction=1.0) as s:
        for step in range(steps):
            X, y = linear_data(rank)
            inner.zero_grad()
            ((m(X) - y) ** 2).mean().backward()
            inner.step()
    return {"w": m.weight.detach().clone(), "k": s.k, "per_sync": list(s.stats.per_sync)}


def run_streaming(rank: int, n: int, merge: str = "ties", quantize: str = "int4") -> dict:
    """Streaming DiLoCo (2 fragments, tau = 1), quantized, with a merge method as the outer step."""
    from mergelab.distributed import DiLoCo

    m = mlp()
    X, y = mlp_data(rank)
    inner = torch.optim.Adam(m.parameters(), lr=0.01)
    outers = [torch.optim.SGD(m[i].parameters(), lr=0.7, momentum=0.9, nesterov=True) for i in (0, 2)]
    params = {"density": 0.5} if merge == "ties" else {}
    with DiLoCo(m, inner, outers, sync_every=4, model_fragments=[m[0], m[2]], fragment_sync_delay=1,
                quantize=quantize, outer_merge=merge, merge_params=params) as d:
        for _ in range(16):
            inner.zero_grad()
            ((m(X) - y) ** 2).mean().backward()
            inner.step()
    return {"params": [p.detach().clone() for p in m.parameters()], "per_sync": list(d.stats.per_sync),
            "syncs": d.syncs}


def run_mismatch(rank: int, n: int) -> dict:
    from mergelab.distributed import DiLoCo, WorkerMismatch

    m = nn.Sequential(nn.Linear(3, 2 if rank == 1 else 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    try:
        DiLoCo(m, opt, opt, sync_every=2)
    except WorkerMismatch as exc:
        return {"error": str(exc)}
    return {"error": None}


def run_all(rank: int, n: int) -> dict:
    """Every scenario in one process group (one start-up for the multi-process test)."""
    return {"linear": run_linear(rank, n), "nan": run_linear(rank, n, nan_sync=NAN_AT_SYNC),
            "sync1": run_sync1(rank, n), "sparta": run_sparta_full(rank, n),
            "streaming": run_streaming(rank, n), "mismatch": run_mismatch(rank, n)}


# -- launching gloo processes -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, n: int, port: int, name: str, out: str) -> None:
    import torch.distributed as dist

    os.environ["NUMBA_NUM_THREADS"] = "1"  # the ties outer merge's kernels: one thread per worker process
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                            timeout=timedelta(seconds=300))
    try:
        result = globals()[name](rank, n)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(n: int, name: str, out: Path, timeout: float = 120.0) -> list[dict]:
    """Run scenario `name` on n gloo processes (torch.multiprocessing spawn); kill them all on timeout."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_entry, args=(n, free_port(), name, str(out)), nprocs=n, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"scenario {name} on {n} processes did not finish in {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(n)]
