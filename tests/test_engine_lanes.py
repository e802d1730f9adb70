"""The engine's lanes (engine/lanes.py): direct writes run side by side, errors raised once all are through."""

from __future__ import annotations

import pytest

pytest.importorskip("numba")

from mergelab.engine.lanes import Task, run_lanes  # noqa: E402


def test_lanes_run_every_task_once_and_raise_a_lanes_error_after_all_finish():
    import threading
    import time

    done, threads = [], set()

    def task(i, fail=False):
        def run():
            time.sleep(0.05 if i == 0 else 0)
            threads.add(threading.get_ident())
            done.append(i)
            if fail:
                raise RuntimeError(f"task {i} failed")
        return Task(100 - i, run)

    run_lanes([task(i) for i in range(9)], 2)
    assert sorted(done) == list(range(9)) and len(threads) == 2  # both lanes worked
    done.clear()
    # The biggest task (0, slow) goes to the calling thread's lane, task 1 (failing) to the other:
    # the error comes out only once the slow lane is through, so nothing is left writing.
    with pytest.raises(RuntimeError, match="task 1 failed"):
        run_lanes([task(0), task(1, fail=True)], 2)
    assert done == [1, 0]


def test_a_forked_child_gets_its_own_lane_threads():
    """After fork the parent's pool threads do not exist in the child: tasks must still run there."""
    import os
    import sys

    if not hasattr(os, "fork") or sys.platform == "darwin":
        pytest.skip("fork")
    ran = []
    run_lanes([Task(2, lambda: ran.append(1)), Task(1, lambda: ran.append(2))], 2)  # the parent's pool exists
    assert sorted(ran) == [1, 2]
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if both lanes ran
        code = 1
        try:
            done = []
            run_lanes([Task(2, lambda: done.append(1)), Task(1, lambda: done.append(2))], 2)
            code = 0 if sorted(done) == [1, 2] else 1
        finally:
            os._exit(code)
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done_pid, status = os.waitpid(pid, os.WNOHANG)
        if done_pid:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's lanes hung")
