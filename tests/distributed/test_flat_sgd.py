"""The outer step on flat buffers (mergelab.distributed.flat) equals torch.optim.SGD.step(), bit for bit."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from mergelab.distributed import DiLoCo, simulate_workers
from mergelab.distributed.flat import _kernel, flat_sgd_step, flat_sgd_supported, flat_views
from mergelab.methods.kernels import kernels_enabled, set_kernels_enabled

CONFIGS = [
    dict(lr=0.7, momentum=0.9, nesterov=True),  # DiLoCo's
    dict(lr=1.0),  # FedAvg's
    dict(lr=0.3, momentum=0.8, dampening=0.1),
    dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
    dict(lr=0.2, weight_decay=0.1),
]


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for shape in [(7, 5), (5,), (3, 2, 41)]]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_flat_step_equals_sgd_step(cfg, dtype, compiled):
    """flat_sgd_step with the gradient sum / 3 against SGD.step() with p.grad = sum / 3, for 5 steps on
    tensors of odd sizes (vector tails included): the same bits, the same momentum state."""
    if compiled:
        pytest.importorskip("numba")
    with _kernels(compiled):
        assert (_kernel(torch.zeros(1)) is not None) == compiled
        _compare(cfg, dtype)


@contextlib.contextmanager
def _kernels(on: bool):
    """mergelab's kernels on or off inside the block (whatever MERGELAB_NO_KERNELS says)."""
    before = kernels_enabled()
    set_kernels_enabled(on)
    try:
        yield
    finally:
        set_kernels_enabled(before)


def _compare(cfg, dtype):
    ref = _params(dtype)
    ours = [nn.Parameter(p.detach().clone()) for p in ref]
    ref_opt = torch.optim.SGD(ref, **cfg)
    our_opt = torch.optim.SGD(ours, **cfg)
    hyper = flat_sgd_supported(our_opt, ours)
    assert hyper is not None
    theta, theta_views = flat_views(ours)
    for v, p in zip(theta_views, ours):
        v.copy_(p.detach())
    mom, mom_views = flat_views(ours)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        sums = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in ref]
        for p, s in zip(ref, sums):
            p.grad = s / 3
        ref_opt.step()
        grad_sum = torch.cat([s.reshape(-1) for s in sums])
        if step == 3:  # the state goes through a state dict and back, as a checkpoint does
            our_opt.load_state_dict(copy.deepcopy(our_opt.state_dict()))
        flat_sgd_step(our_opt, hyper, ours, theta, grad_sum, 3, mom, mom_views)
        for p, v, q in zip(ref, theta_views, ours):
            assert torch.equal(p.detach(), v), (cfg, step)
            assert torch.equal(p.detach(), q.detach()), (cfg, step)  # written into the parameters too
    for p, q in zip(ref, ours):  # SGD's own state: the same momentum buffers, under the same keys
        a, b = ref_opt.state[p].get("momentum_buffer"), our_opt.state[q].get("momentum_buffer")
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    if cfg.get("momentum"):
        ref_sd, our_sd = ref_opt.state_dict(), our_opt.state_dict()
        assert ref_sd["param_groups"] == our_sd["param_groups"]
        assert all(torch.equal(ref_sd["state"][i]["momentum_buffer"], our_sd["state"][i]["momentum_buffer"])
                   for i in ref_sd["state"])


def test_what_the_flat_step_refuses():
    ps = _params()
    assert flat_sgd_supported(torch.optim.Adam(ps), ps) is None
    assert flat_sgd_supported(torch.optim.SGD(ps, lr=0.1, fused=True), ps) is None
    assert flat_sgd_supported(torch.optim.SGD(ps, lr=torch.tensor(0.1)), ps) is None
    assert flat_sgd_supported(torch.optim.SGD([{"params": ps[:1], "lr": 0.1}, {"params": ps[1:], "lr": 0.2}]),
                              ps) is None
    assert flat_sgd_supported(torch.optim.SGD(ps[:2], lr=0.1), ps) is None  # a parameter it does not hold
    hooked = torch.optim.SGD(ps, lr=0.1)
    hooked.register_step_post_hook(lambda *_: None)
    assert flat_sgd_supported(hooked, ps) is None

    class MySGD(torch.optim.SGD):
        pass

    assert flat_sgd_supported(MySGD(ps, lr=0.1), ps) is None
    two_groups = torch.optim.SGD([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1, momentum=0.9)
    assert flat_sgd_supported(two_groups, ps)["momentum"] == 0.9  # equal hyperparameters: fine


def _mlp():
    gen = torch.Generator().manual_seed(3)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return m


def _run(rank, n, flat: bool, streaming: bool):
    m = _mlp()
    gen = torch.Generator().manual_seed(10 + rank)
    X, y = torch.randn(32, 6, generator=gen), torch.randn(32, 3, generator=gen)
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
    outer = torch.optim.SGD(m.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    extra = dict(model_fragments=[m[0], m[2]], fragment_sync_delay=1, fragment_update_alpha=0.5) if streaming else {}
    with DiLoCo(m, inner, outer, sync_every=4, bucket_cap_mb=2e-4, **extra) as d:  # several buckets
        d.flat_outer_step = flat
        for _ in range(4 * 5):
            inner.zero_grad()
            ((m(X) - y) ** 2).mean().backward()
            inner.step()
    moms = [outer.state[p]["momentum_buffer"].clone() for p in m.parameters()]
    assert bool(d._momentum) == flat  # the flat path ran (or not)
    return [p.detach().clone() for p in m.parameters()], moms, d.global_state_dict()


@pytest.mark.parametrize("streaming", [False, True])
def test_diloco_flat_outer_step_equals_outer_step(streaming):
    """The same run with the outer step on flat buffers and through outer.step(): identical bits."""
    flat = simulate_workers(3, lambda r, n: _run(r, n, True, streaming), timeout=60)
    ref = simulate_workers(3, lambda r, n: _run(r, n, False, streaming), timeout=60)
    for (p1, m1, g1), (p2, m2, g2) in zip(flat, ref):
        assert all(torch.equal(a, b) for a, b in zip(p1, p2))
        assert all(torch.equal(a, b) for a, b in zip(m1, m2))
        assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert not torch.equal(flat[0][0][0], _mlp()[0].weight)  # the runs moved
