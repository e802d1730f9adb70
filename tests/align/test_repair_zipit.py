"""REPAIR/RESCALE restore the interpolated statistics; ZipIt merges exactly where the answer is known."""

from __future__ import annotations

import copy

import pytest
import torch
from align_models import MLP, ResNetish, train

import mergelab.align as al
from mergelab.errors import ShapeMismatch
from mergelab.align.repair import _channel_stats, _points


def _data(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.fixture(scope="module")
def pair():
    x, y = _data()
    torch.manual_seed(0)
    a = train(MLP(width=24), x, y, steps=20)
    b = train(MLP(width=24), x, y, steps=20)
    b, _ = al.align(a, b)
    return a, b, x


@pytest.mark.parametrize("mode", ["repair", "rescale"])
def test_repair_gives_the_interpolated_statistics(pair, mode):
    a, b, x = pair
    alpha = 0.3
    merged = al.interpolate_modules(a, b, alpha)
    fixed = al.repair(merged, a, b, [x], alpha=alpha, mode=mode)
    names = _points(fixed, al.spec_for(fixed))
    assert names == ["layers.0", "layers.1", "layers.2"]
    sa, sb = _channel_stats(a, names, [x]), _channel_stats(b, names, [x])
    before, after = _channel_stats(merged, names, [x]), _channel_stats(fixed, names, [x])
    for n in names:
        target_std = (1 - alpha) * sa[n][1] + alpha * sb[n][1]
        target_mean = (1 - alpha) * sa[n][0] + alpha * sb[n][0]
        torch.testing.assert_close(after[n][1], target_std, atol=1e-4, rtol=1e-4)
        if mode == "repair":
            torch.testing.assert_close(after[n][0], target_mean, atol=1e-4, rtol=1e-4)
        assert before[n][1].mean() < target_std.mean()  # the variance collapse REPAIR undoes
    assert not torch.equal(merged.layers[0].weight, fixed.layers[0].weight)  # the input is not changed


def test_repair_at_an_endpoint_is_a_no_op(pair):
    a, b, x = pair
    fixed = al.repair(copy.deepcopy(a), a, b, [x], alpha=0.0)
    torch.testing.assert_close(fixed(x), a(x), atol=1e-4, rtol=1e-4)


def test_repair_batchnorm_network():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (48,), generator=g)
    torch.manual_seed(1)
    a, b = train(ResNetish(), x, y, steps=8), train(ResNetish(), x, y, steps=8)
    b, _ = al.align(a, b)
    merged = al.interpolate_modules(a, b, 0.5)
    fixed = al.repair(merged, a, b, [x])
    bns = ["stem.1", "bn1", "bn2", "bn3"]
    sa, sb, after = (_channel_stats(m, bns, [x]) for m in (a, b, fixed))
    for n in bns:
        torch.testing.assert_close(after[n][1], (sa[n][1] + sb[n][1]) / 2, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(after[n][0], (sa[n][0] + sb[n][0]) / 2, atol=2e-3, rtol=2e-3)


def test_zip_matrices_hand_worked():
    # features: A0 A1 | B0 B1; A0~B1 (0.9), A1~B0 (0.8), A0~A1 (0.85 within A)
    c = torch.eye(4)
    for i, j, v in [(0, 3, 0.9), (1, 2, 0.8), (0, 1, 0.85)]:
        c[i, j] = c[j, i] = v
    M, U = al.zip_matrices(c, 2, within=False)
    assert M.tolist() == [[0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0]]
    assert U.T.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]
    M, U = al.zip_matrices(c, 2, within=True)  # A0-B1 first, then only A1-B0 is left
    assert M.tolist() == [[0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0]]
    c[0, 1] = c[1, 0] = 0.95  # now the within-A pair wins; A's pair is full, so B's two features pair up
    M, _ = al.zip_matrices(c, 2, within=True)
    assert M.tolist() == [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]
    M, U = al.zip_matrices(torch.eye(5), 2)  # 2 + 3 features into 2: clusters of at most 3
    assert M.shape == (2, 5) and sorted(U.sum(0).tolist()) == [2, 3] and torch.equal(U.sum(1), torch.ones(5, dtype=U.dtype))


def test_zipit_of_a_model_with_its_permutation_is_the_model(pair):
    a, _, x = pair
    spec = al.spec_for(a)
    b = copy.deepcopy(a)
    b.load_state_dict(al.apply_permutations(spec, a.state_dict(), al.random_perms(spec, torch.Generator().manual_seed(2))))
    zipped = al.zipit(a, b, [x], within=False)
    torch.testing.assert_close(zipped(x), a(x), atol=1e-5, rtol=1e-5)


def test_partial_zip_with_nothing_zipped_is_the_ensemble(pair):
    a, b, x = pair
    zipped = al.zipit(a, b, [x], layers=0)
    assert zipped.layers[1].weight.shape == (48, 48)
    torch.testing.assert_close(zipped(x), (a(x) + b(x)) / 2, atol=1e-5, rtol=1e-5)
    one = al.zipit(a, b, [x], layers=1)
    assert one.layers[0].weight.shape == (24, 12) and one.layers[1].weight.shape == (48, 24)


def test_zipit_different_widths_and_align_refuses():
    x, _ = _data(3)
    torch.manual_seed(3)
    a, b = MLP(width=16), MLP(width=24)
    zipped = al.zipit(a, b, [x])
    assert zipped.layers[1].weight.shape == (16, 16) and zipped(x).shape == (96, 4)
    with pytest.raises(ShapeMismatch, match="ZipIt"):
        al.align(a, b)
