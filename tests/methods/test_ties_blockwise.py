"""The block-wise TIES path gives the same numbers as the whole-tensor primitives."""

import torch

from mergelab.methods import PerModel
from mergelab.methods import sparsify as sp
from mergelab.methods.sparsify import TaskVectorParams, TiesShared, disjoint_mean, elect_sign, keep_top_magnitude


def _reference(x, base, params, weights, normalize):
    deltas = []
    for row, q, w in zip(x, params, weights):
        d = row - base
        if q.density < 1:
            d = d * keep_top_magnitude(d, q.density)
        deltas.append(d * w)
    deltas = torch.stack(deltas)
    return base + disjoint_mean(deltas, elect_sign(deltas), torch.tensor(weights), normalize=normalize)


def test_blockwise_ties_equals_whole_tensor_with_many_ties(monkeypatch):
    monkeypatch.setattr(sp, "_CHUNK", 1000)  # many blocks, so the tie quota crosses block borders
    monkeypatch.setenv("MERGELAB_NO_KERNELS", "1")  # the torch path (tests/methods/test_ties_kernel.py: the kernel)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (70, 90), generator=g).float()
    x = torch.stack([base + torch.randint(-2, 3, (70, 90), generator=g).float() for _ in range(3)])
    params = [TaskVectorParams(weight=w, density=d) for w, d in ((0.5, 0.3), (1.0, 0.55), (0.7, 1.0))]
    for normalize in (True, False):
        got = sp.ties(x, base, PerModel(params), TiesShared(normalize=normalize))
        want = _reference(x, base, params, [0.5, 1.0, 0.7], normalize)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_kth_largest_matches_kthvalue_on_big_tensors():
    g = torch.Generator().manual_seed(1)
    for flat in (torch.randn(600_000, generator=g).abs(), torch.randint(0, 7, (600_000,), generator=g).float()):
        n = flat.numel()
        for k in (1, 17, n // 3, n // 2, n - 1):
            assert sp.kth_largest(flat, k) == flat.kthvalue(n - k + 1).values
