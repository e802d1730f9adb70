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


def test_a_sinks_select_and_direct_hooks_run_through_engine_run(tmp_path):
    """engine.run runs only the jobs the sink selects, the sink's direct tasks in the lanes, the rest in the loop."""
    import torch
    from safetensors.torch import save_file

    from mergelab.checkpoint.reader import Checkpoint
    from mergelab.engine import MemorySink, run
    from mergelab.planner import make_plan
    from mergelab.recipe import load_recipe

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4), "c": torch.full((3,), 2.0)}
    for name, scale in (("x", 1.0), ("y", 3.0)):
        save_file({k: v * scale for k, v in tensors.items()}, str(tmp_path / f"{name}.safetensors"))
    recipe = load_recipe({"merge_method": "linear", "models": [
        {"model": str(tmp_path / f"{n}.safetensors"), "parameters": {"weight": 0.5}} for n in ("x", "y")]})
    opened = {p: Checkpoint(p) for p in recipe.input_paths()}
    plan = make_plan(recipe, opened)
    out = {k: torch.full_like(v, -1.0) for k, v in tensors.items()}

    class Hooked(MemorySink):
        lanes = 2
        seen: list[str] = []

        def select(self, plan):
            return [j for j in plan.jobs if j.name != "c"]  # "c" is held already

        def direct(self, plan, job, device):
            if job.name != "a":
                return None
            return Task(6, lambda: (self.seen.append("a"), self.tensors["a"].fill_(7.0)))

        def write(self, name, rows, tensor):
            self.seen.append(name)
            super().write(name, rows, tensor)

    sink = Hooked(out)
    run(plan, sink)
    for ck in opened.values():
        ck.close()
    assert sorted(sink.seen) == ["a", "b"]
    assert torch.equal(out["a"], torch.full((2, 3), 7.0))  # the direct task's write, not the merge
    assert torch.equal(out["b"], torch.full((4,), 2.0))  # the loop's merge: 0.5 * 1 + 0.5 * 3
    assert torch.equal(out["c"], torch.full((3,), -1.0))  # not selected: untouched
