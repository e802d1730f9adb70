"""n workers in one process: threads sharing an in-memory group.

`simulate_workers(n, fn)` runs fn(rank, n) on n threads; a DiLoCo or SPARTA
built inside fn (without `group=`/`comm=`) uses the thread's simulated group,
whose collectives sum in rank order. The numbers equal n processes on gloo to
the last bit for 2 workers (a sum of two floats is commutative) and to
rounding of the summation order otherwise.

Threads share torch's global random state: give each worker its own
torch.Generator (or build everything random before calling).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from mergelab.distributed.comm import ThreadComm, ThreadHub

_local = threading.local()


def thread_comm() -> ThreadComm | None:
    """The simulated group of the calling thread, or None outside simulate_workers."""
    return getattr(_local, "comm", None)


def simulate_workers(n: int, fn: Callable[..., Any], *args: Any, timeout: float = 600.0, **kwargs: Any) -> list[Any]:
    """Run fn(rank, n, *args, **kwargs) for rank 0..n-1 on threads; returns their results in rank order.

    Raises the first worker's exception (the others are released from their collectives).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    hub = ThreadHub(n, timeout=timeout)
    results: list[Any] = [None] * n
    errors: list[tuple[int, BaseException]] = []

    def run(rank: int) -> None:
        _local.comm = ThreadComm(hub, rank)
        try:
            results[rank] = fn(rank, n, *args, **kwargs)
        except threading.BrokenBarrierError as exc:
            errors.append((rank, exc))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append((rank, exc))
            hub.barrier.abort()
        finally:
            _local.comm = None

    threads = [threading.Thread(target=run, args=(r,), name=f"mergelab-worker-{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        real = [e for e in errors if not isinstance(e[1], threading.BrokenBarrierError)] or errors
        raise real[0][1]
    return results
