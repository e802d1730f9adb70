"""LocalSGD (parameter averaging every H steps) against a hand-worked reference, FedAvg-DiLoCo against
LocalSGD, and DiLoCoConfig as the one place DiLoCo's settings are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mergelab.distributed import DiLoCo, DiLoCoConfig, LocalSGD, simulate_workers

W0, H, SYNCS, LR = [0.5, -1.0, 0.25], 3, 2, 0.05


def _data(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    X = torch.randn(4, 3, generator=g, dtype=torch.float64)
    return X, X @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64) + rank


def _train(rank: int, n: int, make):
    m = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([W0], dtype=torch.float64))
    inner = torch.optim.SGD(m.parameters(), lr=LR)
    with make(m, inner) as sync:
        for step in range(H * SYNCS):
            X, y = _data(rank, step)
            inner.zero_grad()
            ((m(X)[:, 0] - y) ** 2).mean().backward()
            inner.step()
    return m.weight.detach().clone()[0], sync.syncs


def _hand(n: int) -> np.ndarray:
    """H SGD steps on mean (Xw - y)^2 per worker, then w <- the workers' mean, SYNCS times."""
    w = np.array(W0)
    for s in range(SYNCS):
        ends = []
        for r in range(n):
            wl = w.copy()
            for h in range(H):
                X, y = (t.numpy() for t in _data(r, s * H + h))
                wl = wl - LR * 2.0 / len(y) * X.T @ (X @ wl - y)
            ends.append(wl)
        w = np.mean(ends, axis=0)
    return w


def test_local_sgd_averages_parameters_every_h_steps():
    out = simulate_workers(2, _train, lambda m, inner: LocalSGD(m, inner, H))
    ref = _hand(2)
    for w, syncs in out:
        np.testing.assert_allclose(w.numpy(), ref, rtol=0, atol=1e-12)
        assert syncs == SYNCS
    assert not np.allclose(ref, W0)


def test_fedavg_diloco_equals_local_sgd():
    """DiLoCo with outer SGD(lr=1) sets theta to the workers' mean: LocalSGD's sync, by another route."""
    fedavg = simulate_workers(2, _train, lambda m, inner: DiLoCo(m, inner, torch.optim.SGD(m.parameters(), lr=1.0),
                                                                   sync_every=H))
    np.testing.assert_allclose(fedavg[0][0].numpy(), _hand(2), rtol=0, atol=1e-12)


def test_config_and_keywords_give_the_same_run():
    outer = lambda m: torch.optim.SGD(m.parameters(), lr=0.7, momentum=0.9, nesterov=True)  # noqa: E731
    cfg = DiLoCoConfig(sync_every=H, outer_merge="mean")
    a = simulate_workers(2, _train, lambda m, inner: DiLoCo(m, inner, outer(m), config=cfg))
    b = simulate_workers(2, _train, lambda m, inner: DiLoCo(m, inner, outer(m), H, outer_merge="mean"))
    assert torch.equal(a[0][0], b[0][0]) and not torch.equal(a[0][0], torch.tensor(W0, dtype=torch.float64))


def test_config_errors_name_the_option():
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="unknown DiLoCo option 'sync_evry'"):
        DiLoCo(m, opt, opt, sync_evry=2)
    with pytest.raises(TypeError, match="not both"):
        DiLoCo(m, opt, opt, 2, config=DiLoCoConfig(sync_every=2))
    with pytest.raises(TypeError, match="needs sync_every"):
        DiLoCo(m, opt, opt)
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1, got 0"):
        DiLoCoConfig(sync_every=0)
    with pytest.raises(ValueError, match="multiple of the number of fragments"):
        simulate_workers(1, lambda r, n: LocalSGD(m, opt, 3, model_fragments=[[m.weight], [m.bias]]))
