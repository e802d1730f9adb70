"""DiLoCo, SPARTA and Streaming DiLoCo on 3 gloo processes, against hand-worked references,
torch's DistributedDataParallel, and simulate_workers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dist_scenarios as sc
from mergelab.distributed import simulate_workers

N = 3


@pytest.fixture(scope="module")
def mp_results(tmp_path_factory):
    """run_all on 3 gloo processes (one start-up for every test here)."""
    # a bound, not an expectation: on an idle 2-core machine this takes ~15 s
    return sc.launch(N, "run_all", tmp_path_factory.mktemp("gloo"), timeout=600)


@pytest.fixture(scope="module")
def sim_results():
    return simulate_workers(N, sc.run_all, timeout=120)


def hand_linear(n: int, exclude: dict[int, set[int]] | None = None) -> np.ndarray:
    """DiLoCo worked by hand: H SGD steps on 1/4 |Xw - y|^2 per worker, mean pseudo-gradient over the
    finite workers, outer SGD with Nesterov momentum (buf = g at the first step, then mu buf + g;
    w -= lr (g + mu buf))."""
    p = sc.LINEAR
    w = np.array(sc.W0)
    buf = None
    for s in range(p["syncs"]):
        deltas = []
        for r in range(n):
            wl = w.copy()
            for h in range(p["H"]):
                X, y = (t.numpy() for t in sc.linear_data(r, 1 if exclude else None, s * p["H"] + h))
                grad = 2.0 / 4.0 * X.T @ (X @ wl - y[:, 0])
                wl = wl - p["lr"] * grad
            if np.isfinite(wl).all():
                deltas.append(w - wl)
        g = np.mean(deltas, axis=0)
        buf = g.copy() if buf is None else p["momentum"] * buf + g
        w = w - p["outer_lr"] * (g + p["momentum"] * buf)
    return w


def test_linear_matches_hand_worked_reference(mp_results):
    ref = hand_linear(N)
    for r in range(N):
        np.testing.assert_allclose(mp_results[r]["linear"]["w"].numpy()[0], ref, atol=1e-6, rtol=0)
    assert not np.allclose(ref, sc.W0)  # the run moved


def test_bytes_counted_from_the_reduced_tensors(mp_results):
    res = mp_results[0]["linear"]
    # per sync: one bucket of 3 float64 pseudo-gradient values + the N float32 "finite" flags
    payload = 3 * 8 + N * 4
    assert [p for p, _ in res["per_sync"]] == [payload] * sc.LINEAR["syncs"]
    assert res["report"]["payload_bytes"] == payload * sc.LINEAR["syncs"]
    assert math.isclose(res["report"]["wire_bytes"], payload * sc.LINEAR["syncs"] * 2 * (N - 1) / N)
    assert res["report"]["syncs"] == sc.LINEAR["syncs"]
    assert 0 <= res["report"]["comm_seconds"] <= res["report"]["wall_seconds"]


def test_nan_worker_left_out_on_every_rank(mp_results):
    ref = hand_linear(N, exclude={sc.NAN_AT_SYNC: {1}})
    for r in range(N):
        res = mp_results[r]["nan"]
        assert np.isfinite(res["w"].numpy()).all()
        np.testing.assert_allclose(res["w"].numpy()[0], ref, atol=1e-6, rtol=0)
        assert any("worker(s) [1]" in w and "NaN/Inf" in w for w in res["warnings"]), res["warnings"]
        # the NaN sync reduced twice: the bucket and the N float32 flags, then the bucket without worker 1
        expected = [3 * 8 + N * 4] * sc.LINEAR["syncs"]
        expected[sc.NAN_AT_SYNC] += 3 * 8
        assert [p for p, _ in res["per_sync"]] == expected


def test_sync_every_1_is_synchronous_data_parallel_sgd(mp_results):
    # single-process reference: SGD on the mean over workers of their mean-squared-error gradients
    m = sc.mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        loss = sum(((m(X) - y) ** 2).mean() for X, y in (sc.mlp_data(r) for r in range(N))) / N
        loss.backward()
        opt.step()
    for r in range(N):
        for a, b, c in zip(mp_results[r]["sync1"]["diloco"], mp_results[r]["sync1"]["ddp"], m.parameters()):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)  # torch DDP
            torch.testing.assert_close(a, c.detach(), atol=1e-10, rtol=0)


def test_sparta_fraction_1_averages_every_step(mp_results):
    w = np.array(sc.W0)
    for _ in range(4):
        locals_ = []
        for r in range(N):
            X, y = (t.numpy() for t in sc.linear_data(r))
            locals_.append(w - sc.LINEAR["lr"] * 2.0 / 4.0 * X.T @ (X @ w - y[:, 0]))
        w = np.mean(locals_, axis=0)
    for r in range(N):
        np.testing.assert_allclose(mp_results[r]["sparta"]["w"].numpy()[0], w, atol=1e-6, rtol=0)
        assert mp_results[r]["sparta"]["k"] == 3
        assert [p for p, _ in mp_results[r]["sparta"]["per_sync"]] == [3 * 4] * 4  # 3 float32 values


def test_streaming_schedule_and_quantized_bytes(mp_results):
    res = mp_results[0]["streaming"]
    assert res["syncs"] == 8  # 16 steps, a fragment every 4 / 2 = 2 steps
    # fragment 0: Linear(4, 8) = 40 values, fragment 1: Linear(8, 2) = 18 values, alternating;
    # int4: one 64-value block each -> 32 code bytes + one float32 scale; plus the N flags
    assert [p for p, _ in res["per_sync"]] == [32 + 4 + 4 * N] * 8
    for r in range(1, N):  # every worker holds the same model after the last sync of each fragment?
        for a, b in zip(mp_results[r]["streaming"]["params"], res["params"]):
            assert a.shape == b.shape


def test_mismatched_models_raise_on_every_rank(mp_results):
    for r in range(N):
        msg = mp_results[r]["mismatch"]["error"]
        assert msg is not None and "0.weight" in msg and "(2, 3)" in msg and "(1, 3)" in msg


def test_simulation_equals_processes(mp_results, sim_results):
    for r in range(N):
        for key in ("linear", "nan", "sparta"):
            torch.testing.assert_close(sim_results[r][key]["w"], mp_results[r][key]["w"], atol=1e-6, rtol=0)
        for a, b in zip(sim_results[r]["sync1"]["diloco"], mp_results[r]["sync1"]["diloco"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        for a, b in zip(sim_results[r]["streaming"]["params"], mp_results[r]["streaming"]["params"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert sim_results[r]["linear"]["per_sync"] == mp_results[r]["linear"]["per_sync"]
        assert sim_results[r]["mismatch"]["error"] == mp_results[r]["mismatch"]["error"]
