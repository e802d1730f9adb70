"""The search's cached candidate paths: the NaN check once per search, the lanes, memory groups."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")


def test_an_input_holding_nan_is_refused_once_with_its_name(tmp_path):
    from safetensors.torch import save_file

    from mergelab.errors import NonFiniteError
    from mergelab.search.candidate import merge_in_memory

    save_file({"w": torch.tensor([1.0, 2.0])}, str(tmp_path / "good.safetensors"))
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(tmp_path / "bad.safetensors"))
    recipe = {"merge_method": "linear", "models": [{"model": str(tmp_path / "good.safetensors"),
                                                   "parameters": {"weight": 1.0}},
                                                  {"model": str(tmp_path / "bad.safetensors"),
                                                   "parameters": {"weight": 1.0}}]}
    with pytest.raises(NonFiniteError, match=r"input w \(.*bad\.safetensors\) holds NaN or Inf"):
        merge_in_memory(recipe)


def test_lanes_run_every_task_once_and_raise_a_lanes_error_after_all_finish():
    import threading
    import time

    from mergelab.search.fastpath import _run_lanes, _Task

    done, threads = [], set()

    def task(i, fail=False):
        def run():
            time.sleep(0.05 if i == 0 else 0)
            threads.add(threading.get_ident())
            done.append(i)
            if fail:
                raise RuntimeError(f"task {i} failed")
        return _Task(100 - i, run)

    _run_lanes([task(i) for i in range(9)], 2)
    assert sorted(done) == list(range(9)) and len(threads) == 2  # both lanes worked
    done.clear()
    # The biggest task (0, slow) goes to the calling thread's lane, task 1 (failing) to the other:
    # the error comes out only once the slow lane is through, so nothing is left writing.
    with pytest.raises(RuntimeError, match="task 1 failed"):
        _run_lanes([task(0), task(1, fail=True)], 2)
    assert done == [1, 0]


def test_a_forked_child_gets_its_own_lane_threads():
    """After fork the parent's pool threads do not exist in the child: tasks must still run there."""
    import os
    import sys

    from mergelab.search.fastpath import _run_lanes, _Task

    if not hasattr(os, "fork") or sys.platform == "darwin":
        pytest.skip("fork")
    ran = []
    _run_lanes([_Task(2, lambda: ran.append(1)), _Task(1, lambda: ran.append(2))], 2)  # the parent's pool exists
    assert sorted(ran) == [1, 2]
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if both lanes ran
        code = 1
        try:
            done = []
            _run_lanes([_Task(2, lambda: done.append(1)), _Task(1, lambda: done.append(2))], 2)
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


def test_memory_groups_join_tensors_whose_memory_overlaps():
    from mergelab.search.fastpath import memory_groups

    buf = torch.zeros(100)
    other = torch.zeros(10)
    tensors = {"whole": buf, "head": buf[:10], "tail": buf[90:], "apart": other, "tied": other,
               "strided": torch.zeros(4, 6)[:, :3], "empty": torch.zeros(0), "fresh": torch.zeros(5)}
    g = memory_groups(tensors)
    assert g["whole"] == g["head"] == g["tail"]  # views inside one buffer
    assert g["apart"] == g["tied"] != g["whole"]  # the same storage twice (a tied lm_head)
    others = [g[n] for n in ("strided", "empty", "fresh")]
    assert len(set(others)) == 3 and not set(others) & {g["whole"], g["apart"]}
    halves = torch.zeros(20)
    assert len(set(memory_groups({"a": halves[:10], "b": halves[10:]}).values())) == 2  # adjacent, apart
