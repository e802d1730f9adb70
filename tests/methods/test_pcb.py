"""pcb against a loop-by-loop computation of the paper's equations, and a merge of saved folders."""

from __future__ import annotations

import math

import numpy as np  # only to compare arrays
import pytest
import torch

import mergelab
from mergelab.checkpoint.tensor_file import load_tensors
from mergelab.methods import PerModel, get_method
from mergelab.methods.pcb import PcbShared
from mergelab.methods.registry import NoParams
from task_model_folders import recipe, save_folders, tiny_state_dicts


def softmax_of_norm(v, n):
    lo, hi = min(v), max(v)
    z = [n * (e - lo) / (hi - lo) if hi > lo else 0.0 for e in v]
    ex = [math.exp(e) for e in z]
    return [e / sum(ex) for e in ex]


def loop_pcb(x, base, ratio, lam):
    """The equations entry by entry in float64 Python floats (flattened tensor), no torch, no vectors."""
    taus = [[float(a) - float(b) for a, b in zip(row, base)] for row in x]
    n, d = len(taus), len(base)
    betas = []
    for i in range(n):
        intra = softmax_of_norm([t * t for t in taus[i]], n)
        inter = [0.0] * d
        for j in range(n):
            sj = softmax_of_norm([a * b for a, b in zip(taus[i], taus[j])], n)
            inter = [u + v for u, v in zip(inter, sj)]
        betas.append([a * b for a, b in zip(intra, inter)])
    k = max(1, d - int(d * (1 - ratio)))
    out = []
    for e in range(d):
        num = den = 0.0
        for i in range(n):
            kth = sorted(betas[i], reverse=True)[k - 1]
            if betas[i][e] >= kth:
                num += betas[i][e] * taus[i][e]
                den += betas[i][e]
        out.append(float(base[e]) + lam * (num / den if den > 0 else 0.0))
    return np.array(out)


def run(x, base, **shared):
    return get_method("pcb").fn(x, base, PerModel([NoParams()] * len(x)), PcbShared(**shared))


@pytest.mark.parametrize("n,shape,ratio,lam", [(3, (6, 5), 0.1, 1.0), (2, (7,), 0.5, 0.8),
                                               (4, (3, 4), 1.0, 1.0), (3, (10, 10), 0.2, 1.5)])
def test_matches_the_loop_by_loop_numpy_computation(n, shape, ratio, lam):
    g = torch.Generator().manual_seed(n * 7 + len(shape))
    base = torch.randn(shape, generator=g)
    x = base + 0.1 * torch.randn((n, *shape), generator=g)
    got = run(x, base, pcb_ratio=ratio, **{"lambda": lam})
    want = loop_pcb(x.reshape(n, -1).tolist(), base.flatten().tolist(), ratio, lam)
    assert got.shape == base.shape
    np.testing.assert_allclose(got.flatten().double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_entries_no_task_keeps_stay_at_the_base():
    base = torch.zeros(10)
    x = torch.zeros(2, 10)
    x[0, 0], x[1, 0] = 1.0, 2.0  # both tasks keep entry 0 only (ratio 0.1 of 10 entries)
    got = run(x, base, pcb_ratio=0.1)
    assert got[1:].abs().max() == 0 and 1.0 < float(got[0]) < 2.0


def test_ratio_one_keeps_every_entry_a_weighted_mean():
    g = torch.Generator().manual_seed(3)
    base, x = torch.zeros(8), torch.randn(3, 8, generator=g)
    got = run(x, base, pcb_ratio=1.0)
    assert bool(((got >= x.min(0).values - 1e-6) & (got <= x.max(0).values + 1e-6)).all())


def test_merge_of_saved_folders(tmp_path):
    base, fts = tiny_state_dicts(3, seed=6)
    pb, pf = save_folders(tmp_path / "in", base, fts)
    mergelab.merge(recipe("pcb", pb, pf, pcb_ratio=0.3, **{"lambda": 0.9}), tmp_path / "out")
    got = load_tensors(tmp_path / "out" / "model.safetensors")
    for k, b in base.items():
        want = run(torch.stack([ft[k] for ft in fts]), b, pcb_ratio=0.3, **{"lambda": 0.9})
        assert torch.allclose(got[k], want, atol=1e-6), k
