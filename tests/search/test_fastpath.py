"""The search's cached candidate paths: magnitude-index lookups against a sort, skipping, memory budget."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

from mergelab.search.magnitude import MagnitudeIndex  # noqa: E402


def _reference(x: torch.Tensor, base: torch.Tensor, k: int) -> tuple[float, int]:
    """(k-th largest |x - base|, flat index of the first tied entry that does not fit) by a full stable sort."""
    mag = (x.float() - base.float()).abs().reshape(-1)
    # Descending magnitude, ascending index among equals: the order in which TIES keeps entries.
    order = torch.sort(mag, descending=True, stable=True).indices
    t = mag[order[k - 1]]
    cutoff = int(order[k]) if k < mag.numel() and mag[order[k]] == t else mag.numel()
    return float(t), cutoff


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_index_lookup_equals_a_full_sort_for_every_k(dtype, tied):
    g = torch.Generator().manual_seed(3 + tied)
    n = 3001
    if tied:  # few distinct magnitudes, many entries equal to each: the tie cut-off matters
        base = (torch.randint(-3, 4, (n,), generator=g).float() / 8).to(dtype)
        x = (base.float() + torch.randint(-2, 3, (n,), generator=g).float() / 8).to(dtype)
    else:
        base = torch.randn(n, generator=g).to(dtype)
        x = (base.float() + 0.05 * torch.randn(n, generator=g)).to(dtype)
    idx = MagnitudeIndex.build(x, base)
    mag = (x.float() - base.float()).abs()
    # the whole order is TIES's keeping order: magnitude descending, flat index ascending among equals
    assert idx.order.tolist() == torch.sort(mag, descending=True, stable=True).indices.tolist()
    for k in [1, 2, 7, 100, 1500, 2999, 3000, *range(1, n, 97)]:
        t, cutoff = idx.select(k, x, base)
        want_t, want_cut = _reference(x, base, k)
        assert float(t) == want_t and cutoff == want_cut, k
        # exactly k entries kept by the rule "above T, or equal to T below the cut-off"
        kept = (mag > t) | ((mag == t) & (torch.arange(n) < cutoff))
        assert int(kept.sum()) == k
    with pytest.raises(ValueError):
        idx.select(n, x, base)


def test_index_of_a_multidimensional_tensor_uses_flat_indices():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 53, generator=g)
    x = base + torch.randn(37, 53, generator=g)
    idx = MagnitudeIndex.build(x, base)
    for k in (1, 400, 1960):
        assert (float(idx.select(k, x, base)[0]), idx.select(k, x, base)[1]) == _reference(x, base, k)
    assert idx.nbytes == MagnitudeIndex.nbytes_for(37 * 53)


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


def test_order_of_a_bucket_bigger_than_the_counting_sort_bound():
    # 200,000 magnitudes in [1, 1 + 300 * 2^-23): one bucket of the top 16 bits, 300 low values, all tied
    # with hundreds of others: the big-bucket path (a counting sort) must keep indices ascending among equals.
    g = torch.Generator().manual_seed(5)
    n = 200_000
    base = torch.randn(n, generator=g) * 1e-3
    mag = 1 + torch.randint(0, 300, (n,), generator=g).double() * 2.0**-23
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    x = ((base.double() + sign * mag)).float()
    idx = MagnitudeIndex.build(x, base)
    want = torch.sort((x - base).abs(), descending=True, stable=True).indices
    assert torch.equal(torch.from_numpy(idx.order).long(), want)
    for k in (1, 5000, 123_457, n - 1):
        assert (float(idx.select(k, x, base)[0]), idx.select(k, x, base)[1]) == _reference(x, base, k)


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
