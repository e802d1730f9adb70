"""Lanes: jobs a sink writes itself (kernels straight into preallocated tensors), run a few at a time.

A search merges every candidate into one in-memory model; most of its tensors are too small for
a parallel loop to pay for waking its threads, so instead whole tensors run side by side, each on
one thread (`one_thread`), the biggest first, each to the least loaded lane. The lane threads are
made once per process (a forked child makes its own).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

__all__ = ["Task", "run_lanes"]


@dataclasses.dataclass(frozen=True)
class Task:
    """One direct write: run() fills its output tensor; cost balances the lanes."""

    cost: int  # entries read and written: what the lanes are balanced on
    run: Callable[[], None]


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool): a forked child makes its own
_POOL_LOCK = threading.Lock()


def _lane_pool(workers: int) -> ThreadPoolExecutor:
    """The process's lane threads (created once per process, at least `workers`)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
            size = max(workers, (os.cpu_count() or 2) - 1)
            _POOL = (os.getpid(), size, ThreadPoolExecutor(max_workers=size, thread_name_prefix="mergelab-lane"))
        return _POOL[2]


def run_lanes(tasks: list[Task], lanes: int) -> None:
    """Run `tasks`, `lanes` at a time, each on one thread (compiled passes release the GIL).

    Tasks go to lanes largest first, each to the least loaded lane; the calling thread runs
    the first lane. Every lane is waited for before an error is raised, so no thread still
    writes into the model when this returns.
    """
    from mergelab.methods.kernels import one_thread

    def lane(mine: list[Task]) -> None:
        with one_thread():
            for task in mine:
                task.run()

    lanes = max(1, min(lanes, len(tasks)))
    if lanes == 1:
        lane(tasks)
        return
    loads, split = [0] * lanes, [[] for _ in range(lanes)]
    for task in sorted(tasks, key=lambda t: -t.cost):
        i = loads.index(min(loads))
        loads[i] += task.cost
        split[i].append(task)
    futures = [_lane_pool(lanes - 1).submit(lane, mine) for mine in split[1:]]
    try:
        lane(split[0])
    finally:
        wait(futures)
    for f in futures:
        f.result()  # a lane's error, raised here
