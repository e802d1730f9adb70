"""Parity with torchft 0.2.0's DiLoCo (torchft.local_sgd.DiLoCo with a real Manager and Lighthouse,
replicas on threads): the same model, data and optimizers give the same parameters."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch

import dist_scenarios as sc
from mergelab.distributed import simulate_workers

torchft = pytest.importorskip("torchft")
N = 2


def _torchft_run(n: int, body, timeout: float = 60.0) -> list:
    """Run body(manager_factory, rank) for n replica groups of one process each, on threads."""
    import torch.distributed as dist
    from torchft.coordination import LighthouseServer
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    try:
        lighthouse = LighthouseServer(bind="[::]:0", min_replicas=n)
    except Exception as exc:  # noqa: BLE001 - no lighthouse here: skip, not fail
        pytest.skip(f"torchft's lighthouse cannot start here: {exc}")

    def run(rank: int):
        store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
        holder = {}

        def make(state_dict, load_state_dict):
            holder["m"] = Manager(pg=ProcessGroupGloo(), min_replica_size=n, load_state_dict=load_state_dict,
                                  state_dict=state_dict, replica_id=str(rank), store_addr="localhost",
                                  store_port=store.port, rank=0, world_size=1,
                                  lighthouse_addr=lighthouse.address(), port=sc.free_port(),
                                  timeout=timedelta(seconds=20), use_async_quorum=False,
                                  init_sync=False)  # identical init: no healing at step 0
            return holder["m"]

        try:
            return body(make, rank)
        finally:
            if "m" in holder:
                holder["m"].shutdown(wait=False)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ThreadPoolExecutor(n) as pool:
                futures = [pool.submit(run, r) for r in range(n)]
                return [f.result(timeout=timeout) for f in futures]
    finally:
        lighthouse.shutdown()


def _tf_linear(make, rank):
    from torchft.local_sgd import DiLoCo

    m = sc.linear_model()
    inner = torch.optim.SGD(m.parameters(), lr=sc.LINEAR["lr"])
    outer = torch.optim.SGD(m.parameters(), lr=sc.LINEAR["outer_lr"], momentum=sc.LINEAR["momentum"], nesterov=True)
    mgr = make(lambda: {"m": m.state_dict()}, lambda sd: m.load_state_dict(sd["m"]))
    with DiLoCo(mgr, [m], inner, outer, sync_every=sc.LINEAR["H"], backup_device=torch.device("cpu")):
        for step in range(sc.LINEAR["H"] * sc.LINEAR["syncs"]):
            X, y = sc.linear_data(rank)
            inner.zero_grad()
            ((m(X) - y) ** 2).mean().backward()
            inner.step()
    return m.weight.detach().clone(), mgr.current_step()


def _tf_streaming(make, rank):
    from torchft.local_sgd import DiLoCo

    m = sc.mlp()
    X, y = sc.mlp_data(rank)
    inner = torch.optim.Adam(m.parameters(), lr=0.01)
    outers = [torch.optim.SGD(m[i].parameters(), lr=0.7, momentum=0.9, nesterov=True) for i in (0, 2)]
    mgr = make(lambda: {"m": m.state_dict()}, lambda sd: m.load_state_dict(sd["m"]))
    with DiLoCo(mgr, [m[0], m[2]], inner, outers, sync_every=4, fragment_sync_delay=1,
                backup_device=torch.device("cpu")):
        for _ in range(16):
            inner.zero_grad()
            ((m(X) - y) ** 2).mean().backward()
            inner.step()
    return [p.detach().clone() for p in m.parameters()], mgr.current_step()


def test_diloco_matches_torchft():
    ours = simulate_workers(N, sc.run_linear)
    theirs = _torchft_run(N, _tf_linear)
    for r in range(N):
        w, steps = theirs[r]
        assert steps == sc.LINEAR["syncs"]
        torch.testing.assert_close(ours[r]["w"], w, atol=1e-5, rtol=0)
    assert not torch.allclose(theirs[0][0], torch.tensor([sc.W0], dtype=torch.float64))


def test_streaming_diloco_matches_torchft():
    ours = simulate_workers(N, sc.run_streaming, merge="mean", quantize="none")
    theirs = _torchft_run(N, _tf_streaming)
    for r in range(N):
        params, steps = theirs[r]
        assert steps == ours[r]["syncs"] == 8
        for a, b in zip(ours[r]["params"], params):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
