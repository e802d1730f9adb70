"""Task-vector geometry primitives against numpy and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.analysis.group_stats import GroupStats
from mergelab.analysis.geometry import (
    GeometrySums,
    cosine_from_gram,
    gram,
    kept_mass,
    sign_conflicts,
    spectral_overlap,
    tensor_geometry,
    top_left_singular,
    trim_top_magnitude,
)

FAST = settings(max_examples=25, deadline=None)


def numpy_sign_conflicts(d: np.ndarray) -> tuple[int, int, float]:
    """The definition applied one coordinate at a time."""
    flat = d.reshape(d.shape[0], -1)
    conflicts = contested = 0
    chance = 0.0
    for col in flat.T:
        signs = {np.sign(v) for v in col if v != 0}
        m = int(np.count_nonzero(col))
        if m >= 2:
            contested += 1
            conflicts += len(signs) > 1
            chance += 1 - 2.0 ** (1 - m)
    return conflicts, contested, chance


def numpy_overlap(mats: np.ndarray) -> np.ndarray:
    bases = []
    for m in mats:
        u, s, _ = np.linalg.svd(m.astype(np.float64), full_matrices=False)
        # Rank at float32 precision: the inputs are float32, so smaller singular values are rounding.
        k = min(8, int(np.sum(s > s[0] * max(m.shape) * np.finfo(np.float32).eps)))
        bases.append(u[:, :k])
    n = len(bases)
    return np.array([[np.sum((bases[i].T @ bases[j]) ** 2) / min(bases[i].shape[1], bases[j].shape[1])
                      for j in range(n)] for i in range(n)])


@FAST
@given(n=st.integers(2, 4), shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), seed=st.integers(0, 10**6))
def test_cosine_matches_numpy(n, shape, seed):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    flat = x.reshape(n, -1).double().numpy()
    norms = np.linalg.norm(flat, axis=1)
    expected = flat @ flat.T / np.outer(norms, norms)
    np.testing.assert_allclose(cosine_from_gram(gram(x)).numpy(), expected, atol=1e-5)


def test_cosine_of_zero_vector_is_nan():
    c = cosine_from_gram(gram(torch.tensor([[1.0, 2.0], [0.0, 0.0]])))
    assert c[0, 0] == pytest.approx(1.0) and torch.isnan(c[0, 1]) and torch.isnan(c[1, 1])


def test_sign_conflicts_hand_worked():
    d = torch.tensor([[1.0, -2.0, 0.0, 3.0], [2.0, 1.0, 0.0, 0.0], [0.0, -1.0, 5.0, -1.0]])
    # col 0: +,+ agree; col 1: -,+,- conflict; col 2: one nonzero, not contested; col 3: +,- conflict.
    conflicts, contested, chance = sign_conflicts(d)
    assert (conflicts, contested) == (2, 3)
    assert chance == pytest.approx(0.5 + 0.75 + 0.5)


@FAST
@given(n=st.integers(2, 4), size=st.integers(1, 40), zero_share=st.floats(0, 0.9), seed=st.integers(0, 10**6))
def test_sign_conflicts_match_numpy(n, size, zero_share, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, size, generator=g) * (torch.rand(n, size, generator=g) >= zero_share)
    got = sign_conflicts(d)
    want = numpy_sign_conflicts(d.numpy())
    assert got[:2] == want[:2] and got[2] == pytest.approx(want[2])


def test_trim_and_kept_mass_hand_worked():
    d = torch.tensor([[3.0, -1.0, 2.0, -4.0], [0.5, 0.0, -0.25, 0.0]])
    before = d.clone()
    trimmed = trim_top_magnitude(d, 0.5)
    assert trimmed.tolist() == [[3.0, 0.0, 0.0, -4.0], [0.5, 0.0, -0.25, 0.0]]
    assert kept_mass(d, 0.5).tolist() == [7.0, 0.75]  # of L1 masses 10 and 0.75
    assert kept_mass(d, 0.25).tolist() == [4.0, 0.5]
    assert torch.equal(d, before)


def test_spectral_overlap_matches_numpy_on_low_rank_matrices():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(20, 3, generator=g)
    mats = torch.stack([
        shared @ torch.randn(3, 12, generator=g),  # rank 3 in span(shared)
        torch.cat([shared, torch.randn(20, 2, generator=g)], 1) @ torch.randn(5, 12, generator=g),  # rank 5
        torch.randn(20, 12, generator=g),  # full rank 12 -> k = 8
    ])
    overlap, chance = spectral_overlap(mats)
    np.testing.assert_allclose(overlap.numpy(), numpy_overlap(mats.numpy()), atol=1e-5)
    assert overlap[0, 1] == pytest.approx(1.0, abs=1e-5)  # a subspace inside the other
    assert chance[0, 2] == pytest.approx(8 / 20)


def test_spectral_overlap_orthogonal_and_zero():
    a = torch.zeros(6, 4)
    a[0, 0], a[1, 1] = 1.0, 2.0
    b = torch.zeros(6, 4)
    b[2, 0], b[3, 2] = 3.0, 1.0
    overlap, _ = spectral_overlap(torch.stack([a, b, torch.zeros(6, 4)]))
    assert overlap[0, 1] == pytest.approx(0.0, abs=1e-7)
    assert torch.isnan(overlap[2]).all()


def test_randomized_svd_finds_the_top_subspace():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(300, 4, generator=g) @ torch.randn(4, 280, generator=g) * 10
    m = low + 0.01 * torch.randn(300, 280, generator=g)  # min side 280 > 256: randomized path
    u = top_left_singular(m)
    exact = np.linalg.svd(m.double().numpy(), full_matrices=False)[0][:, :8]
    # The top-4 directions carry the signal: both bases must span them.
    assert np.sum((u[:, :4].double().numpy().T @ exact[:, :4]) ** 2) == pytest.approx(4.0, abs=1e-3)


def test_large_matrices_are_compared_on_an_even_subgrid():
    g = torch.Generator().manual_seed(2)
    mats = torch.randn(2, 40, 30, generator=g)
    rows = torch.linspace(0, 39, 16).round().long()
    cols = torch.linspace(0, 29, 16).round().long()
    sub = mats[:, rows][:, :, cols].numpy()
    overlap, _ = spectral_overlap(mats, max_dim=16)
    np.testing.assert_allclose(overlap.numpy(), numpy_overlap(sub), atol=1e-5)


def test_sums_add_up_like_one_concatenated_tensor():
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(3, 5, 4, generator=g), torch.randn(3, 7, generator=g)
    r1, r2 = torch.randn(5, 4, generator=g), torch.randn(7, generator=g)
    total = GeometrySums(3)
    total.add(tensor_geometry(w1, r1, 0.5))
    total.add(tensor_geometry(w2, r2, 0.5))
    stats = GroupStats.from_sums("both", total)
    deltas = np.concatenate([(w1 - r1).reshape(3, -1).numpy(), (w2 - r2).reshape(3, -1).numpy()], axis=1)
    norms = np.linalg.norm(deltas, axis=1)
    np.testing.assert_allclose(stats.task_norm, norms, rtol=1e-5)
    np.testing.assert_allclose(np.array(stats.task_cosine), deltas @ deltas.T / np.outer(norms, norms), atol=1e-5)
    conflicts, contested, _ = numpy_sign_conflicts(deltas)
    assert stats.sign_conflict == pytest.approx(conflicts / contested)
    # Only w1 is 2-D, so the overlap is that tensor's.
    np.testing.assert_allclose(np.array(stats.spectral_overlap), numpy_overlap((w1 - r1).numpy()), atol=1e-5)
    assert stats.n_params == 27 and stats.n_tensors == 2


def test_big_tensors_use_a_sampled_threshold(monkeypatch):
    from mergelab.analysis import geometry

    monkeypatch.setattr(geometry, "EXACT_TOPK_MAX_NUMEL", 1000)
    monkeypatch.setattr(geometry, "SAMPLE_SIZE", 20000)
    d = torch.randn(2, 300, 400, generator=torch.Generator().manual_seed(4))
    trimmed = trim_top_magnitude(d, 0.2)
    kept_share = (trimmed != 0).double().mean(dim=(1, 2))
    np.testing.assert_allclose(kept_share.numpy(), 0.2, atol=0.01)
    exact = np.sort(np.abs(d.reshape(2, -1).numpy()), axis=1)[:, ::-1][:, :24000].sum(axis=1)
    np.testing.assert_allclose(kept_mass(d, 0.2).numpy(), exact, rtol=0.02)
