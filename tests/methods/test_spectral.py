"""Tests of methods/spectral.py: TSV-M, Iso-C, Iso-CTS.

References: hand-built task matrices with orthogonal singular vectors whose merge is known in
closed form, and the authors' algorithms written a second way in numpy (full float64 SVDs,
no tolerance) run on the same tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import mergelab
from mergelab.errors import MergeError, RecipeError, ShapeMismatch
from mergelab.methods import NoParams, PerModel, get_method
from mergelab.methods.spectral import iso_cts_split, numerical_svd, procrustes_orthogonalize

EPS32 = torch.finfo(torch.float32).eps
METHODS = ("tsv", "iso_c", "iso_cts")


def merge(name, fts, base, **shared):
    spec = get_method(name)
    x = torch.stack(list(fts))
    return spec.fn(x, base, PerModel([NoParams()] * len(x)), spec.shared_params(**shared), None)


def orthonormal(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


# ---- numpy references: the papers' recipes with full float64 SVDs ----------------------------

def np_svd(a):
    return np.linalg.svd(a, full_matrices=False)


def np_polar(m):
    p, _, qt = np_svd(m)
    return p @ qt


def ref_tsv(deltas, k):
    parts = [np_svd(d) for d in deltas]
    u = np.concatenate([p[0][:, :k] for p in parts], axis=1)
    s = np.concatenate([p[1][:k] for p in parts])
    vt = np.concatenate([p[2][:k] for p in parts], axis=0)
    return np_polar(u) @ np.diag(s) @ np_polar(vt.T).T


def ref_iso_c(deltas):
    u, s, vt = np_svd(sum(deltas))
    return s.mean() * (u @ vt)


def ref_iso_cts(deltas, frac):
    r, n_tasks = min(deltas[0].shape), len(deltas)
    per_task = round((r - int(r * frac)) / n_tasks)
    kc = r - n_tasks * per_task
    u, s, vt = np_svd(sum(deltas))
    us, ss, vts = [u[:, :kc]], [s[:kc]], [vt[:kc]]
    for d in deltas:
        ut, st_, vtt = np_svd(d - u[:, :kc] @ (u[:, :kc].T @ d))
        us.append(ut[:, :per_task]), ss.append(st_[:per_task]), vts.append(vtt[:per_task])
    s_all = np.concatenate(ss)
    return s_all.mean() * np_polar(np.concatenate(us, 1)) @ np_polar(np.concatenate(vts, 0).T).T


def random_tasks(n_tasks, shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    fts = [base + 0.1 * torch.randn(shape, generator=g).to(dtype) for _ in range(n_tasks)]
    return base, fts


# ---- closed forms -------------------------------------------------------------------------------

def test_tsv_of_tasks_with_orthogonal_singular_vectors_is_their_exact_sum():
    lu, rv = orthonormal(5, 1)[:, :4].float(), orthonormal(4, 2).float()
    d1 = 3.0 * torch.outer(lu[:, 0], rv[:, 1])
    d2 = 1.0 * torch.outer(lu[:, 2], rv[:, 3])
    base = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    fts = [base + d1, base + d2]
    torch.testing.assert_close(merge("tsv", fts, base), base + d1 + d2, atol=1e-6, rtol=0)
    torch.testing.assert_close(merge("tsv", fts, base, alpha=0.5), base + 0.5 * (d1 + d2), atol=1e-6, rtol=0)


def test_iso_c_turns_singular_values_3_and_1_into_2_and_2_times_alpha():
    lu, rv = orthonormal(2, 4), orthonormal(2, 5)
    d1, d2 = 3.0 * torch.outer(lu[:, 0], rv[:, 0]), 1.0 * torch.outer(lu[:, 1], rv[:, 1])
    base = torch.zeros(2, 2, dtype=torch.float64)
    out = merge("iso_c", [d1, d2], base, alpha=1.3)
    torch.testing.assert_close(out, 1.3 * 2.0 * (lu @ rv.T), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(out), torch.tensor([2.6, 2.6], dtype=torch.float64))


def test_iso_cts_common_and_shared_task_direction_by_hand():
    # r = 4, N = 2, fraction 0.5: k_common = 2, one task direction each. The sum is
    # 4 e1f1 + 3 e2f2 + 2 e3f3; common = {e1f1, e2f2}; both tasks' residual is 1 * e3f3, so the
    # basis [e1 e2 e3 e3] whitens to [e1 e2 e3/sqrt2 e3/sqrt2] and mean(S) = (4+3+1+1)/4.
    e, f = orthonormal(4, 6), orthonormal(4, 7)
    outer = lambda j: torch.outer(e[:, j], f[:, j])  # noqa: E731
    d1, d2 = 4 * outer(0) + outer(2), 3 * outer(1) + outer(2)
    base = torch.zeros(4, 4, dtype=torch.float64)
    got = merge("iso_cts", [d1, d2], base, common_space_fraction=0.5)
    torch.testing.assert_close(got, 2.25 * (outer(0) + outer(1) + outer(2)), atol=1e-12, rtol=0)
    # Iso-C flattens (4, 3, 2) to 3 over the same three directions.
    want = 3.0 * (outer(0) + outer(1) + outer(2))
    torch.testing.assert_close(merge("iso_c", [d1, d2], base), want)


def test_iso_cts_split_by_hand():
    assert iso_cts_split(10, 3, 0.8) == (7, 1)  # floor(8) leaves 2, round(2/3) = 1 per task
    assert iso_cts_split(768, 8, 0.8) == (616, 19)  # round(154/8 = 19.25) = 19
    assert iso_cts_split(4, 2, 0.8) == (4, 0)  # round(0.5) = 0 (ties to even, as the authors)
    assert iso_cts_split(2, 3, 0.0) == (2, 0)  # round(2/3) = 1 would need 3 > r directions


# ---- the authors' recipes in numpy --------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 5), (5, 8), (6, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_numpy_reference(shape, dtype):
    base, fts = random_tasks(3, shape, seed=sum(shape), dtype=dtype)
    deltas = [(t - base).double().numpy() for t in fts]
    r = min(shape)
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-11)
    cases = {
        "tsv": ({"alpha": 0.7}, 0.7 * ref_tsv(deltas, r // 3)),
        "iso_c": ({"alpha": 1.5}, 1.5 * ref_iso_c(deltas)),
        "iso_cts": ({"common_space_fraction": 0.5}, ref_iso_cts(deltas, 0.5)),
    }
    for name, (params, want_delta) in cases.items():
        got = merge(name, fts, base, **params)
        assert got.dtype == dtype
        torch.testing.assert_close((got.double() - base.double()).numpy(), want_delta, **tol, msg=name)


def test_ill_conditioned_float32_matches_float64_reference():
    # Singular values from 1 down to 3e-4: the float64 Gram route must keep every direction.
    u, v = orthonormal(40, 8)[:, :30], orthonormal(30, 9)
    d = (u @ torch.diag(torch.logspace(0, -3.5, 30, dtype=torch.float64)) @ v.T).float()
    base = torch.zeros(40, 30)
    got = merge("iso_c", [d], base)
    want = ref_iso_c([d.double().numpy()])
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6)


def test_iso_cts_with_whole_space_common_is_iso_c():
    base, fts = random_tasks(3, (7, 5), seed=10)
    got = merge("iso_cts", fts, base, common_space_fraction=1.0)
    torch.testing.assert_close(got, merge("iso_c", fts, base))


def test_tsv_with_explicit_rank_fraction_matches_reference():
    base, fts = random_tasks(2, (9, 8), seed=11)
    deltas = [(t - base).double().numpy() for t in fts]
    got = merge("tsv", fts, base, rank_fraction=0.25)  # k = 2 of 8
    np.testing.assert_allclose((got - base).double().numpy(), ref_tsv(deltas, 2), atol=2e-6)


# ---- N identical fine-tunes (documented behaviour) ---------------------------------------------

def test_identical_fine_tunes():
    base, (ft,) = random_tasks(1, (6, 4), seed=12, dtype=torch.float64)
    d = (ft - base).numpy()
    u, s, vt = np_svd(d)
    fts = [ft, ft.clone()]
    # TSV: the best rank-(r/N) = rank-2 approximation of Delta, not 2 * Delta.
    want = u[:, :2] @ np.diag(s[:2]) @ vt[:2]
    np.testing.assert_allclose((merge("tsv", fts, base) - base).numpy(), want, atol=1e-12)
    # Iso-C: N * mean(sigma(Delta)) U V^T.
    np.testing.assert_allclose((merge("iso_c", fts, base) - base).numpy(), 2 * s.mean() * u @ vt, atol=1e-12)
    # Iso-CTS, fraction 0.5: common = top 2 of 2*Delta, each task adds Delta's 3rd direction;
    # mean(2 s1, 2 s2, s3, s3) over the top-3 directions of Delta.
    got = merge("iso_cts", fts, base, common_space_fraction=0.5) - base
    want = (s[0] + s[1] + s[2]) / 2 * u[:, :3] @ vt[:3]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


# ---- degenerate inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shape", [(6, 4), (5,), (2, 3, 3)])
def test_zero_task_vectors_return_base(name, shape):
    base = torch.randn(shape, generator=torch.Generator().manual_seed(13))
    out = merge(name, [base.clone() for _ in range(3)], base, alpha=2.0)
    assert torch.equal(out, base)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shape", [(5,), (2, 3, 3)])
def test_non_matrix_tensors_get_alpha_times_mean_task_vector(name, shape):
    base, fts = random_tasks(3, shape, seed=14)
    want = base + 0.6 * ((fts[0] - base) + (fts[1] - base) + (fts[2] - base)) / 3
    torch.testing.assert_close(merge(name, fts, base, alpha=0.6), want)


def test_tsv_matrix_too_small_for_one_direction_per_task_gets_mean_rule():
    base, fts = random_tasks(3, (2, 5), seed=15)  # r = 2 < N = 3, so k = 0
    want = base + sum(t - base for t in fts) / 3
    torch.testing.assert_close(merge("tsv", fts, base), want)


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_not_mutated(name):
    for shape in [(6, 4), (4,)]:
        base, fts = random_tasks(2, shape, seed=16)
        x = torch.stack(fts)
        x0, b0 = x.clone(), base.clone()
        spec = get_method(name)
        spec.fn(x, base, PerModel([NoParams()] * 2), spec.shared_params(), None)
        assert torch.equal(x, x0) and torch.equal(base, b0)


def test_rank_deficient_iso_c_is_isotropic_on_the_range_only():
    # Integer rank-2 task matrices: exact in float32, so the sum has rank exactly 2 and the
    # null-space directions (arbitrary in an SVD) must not appear in the merge.
    g = torch.Generator().manual_seed(17)
    d1, d2 = ((torch.randint(-3, 4, (8, 1), generator=g) @ torch.randint(-3, 4, (1, 6), generator=g)).float()
              for _ in range(2))
    got = merge("iso_c", [d1, d2], torch.zeros(8, 6)).double().numpy()
    s_sum = np.linalg.svd((d1 + d2).double().numpy(), compute_uv=False)
    q = int(np.linalg.matrix_rank((d1 + d2).double().numpy()))
    s_got = np.linalg.svd(got, compute_uv=False)
    np.testing.assert_allclose(s_got[:q], s_sum[:q].sum() / q, rtol=1e-5)  # flat, same nuclear norm
    np.testing.assert_allclose(s_got[q:], 0, atol=1e-5)


# ---- whitening (orthogonal Procrustes) -----------------------------------------------------------

def test_procrustes_gives_orthonormal_columns_and_the_nearest_such_matrix():
    m = torch.randn(9, 4, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    q = procrustes_orthogonalize(m, EPS32)
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64))
    np.testing.assert_allclose(q.numpy(), np_polar(m.numpy()), atol=1e-10)


def test_procrustes_of_repeated_columns_is_a_partial_isometry():
    m = torch.randn(7, 2, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    q = procrustes_orthogonalize(torch.cat([m, m], dim=1), EPS32)  # (7, 4), rank 2
    proj = q.T @ q
    torch.testing.assert_close(proj @ proj, proj)  # an orthogonal projector of rank 2
    assert abs(float(proj.trace()) - 2) < 1e-10
    torch.testing.assert_close(q[:, :2], q[:, 2:])


def test_tsv_whitened_bases_are_orthonormal_so_spectrum_is_the_kept_values():
    # U_hat, V_hat orthonormal => the singular values of the merged update are exactly the
    # concatenated kept singular values of the tasks.
    base, fts = random_tasks(3, (9, 6), seed=20, dtype=torch.float64)
    kept = np.concatenate([np_svd((t - base).numpy())[1][:2] for t in fts])
    got = np.linalg.svd((merge("tsv", fts, base) - base).numpy(), compute_uv=False)
    np.testing.assert_allclose(got, np.sort(kept)[::-1], rtol=1e-10)


def test_numerical_svd_routes_agree_with_numpy_and_cut_at_top():
    a = torch.randn(8, 5, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    want = np.linalg.svd(a.numpy(), compute_uv=False)
    for eps in (EPS32, torch.finfo(torch.float64).eps):
        for mat in (a, a.T):
            u, s, vh = numerical_svd(mat, eps)
            np.testing.assert_allclose(s.numpy(), want, rtol=1e-10)
            torch.testing.assert_close(u @ torch.diag(s) @ vh, mat)
        u, s, vh = numerical_svd(a, eps, top=2)
        assert u.shape == (8, 2) and s.shape == (2,) and vh.shape == (2, 5)


# ---- invariants (hypothesis) ---------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.sampled_from(METHODS), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6),
       st.integers(0, 10_000), st.sampled_from([0.5, 3.0]))
def test_task_order_does_not_matter_and_merge_is_homogeneous(name, n_tasks, m, n, seed, c):
    base, fts = random_tasks(n_tasks, (m, n), seed, dtype=torch.float64)
    out = merge(name, fts, base) - base
    perm = torch.randperm(n_tasks, generator=torch.Generator().manual_seed(seed)).tolist()
    torch.testing.assert_close(merge(name, [fts[i] for i in perm], base) - base, out, atol=1e-10, rtol=1e-9)
    scaled = merge(name, [base + c * (t - base) for t in fts], base) - base
    torch.testing.assert_close(scaled, c * out, atol=1e-10, rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(METHODS), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6),
       st.integers(0, 2), st.integers(0, 10_000))
def test_low_rank_task_matrices_stay_in_the_tasks_span(name, n_tasks, m, n, rank, seed):
    # Integer low-rank task matrices (exact in float32): the merged update must be finite and
    # lie in the span of the tasks' column and row spaces, i.e. no arbitrary null-space
    # directions of a rank-deficient SVD may leak in.
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-5, 6, (m, n), generator=g).float()
    fts = [base + (torch.randint(-2, 3, (m, rank), generator=g)
                   @ torch.randint(-2, 3, (rank, n), generator=g)).float() for _ in range(n_tasks)]
    out = merge(name, fts, base)
    assert torch.isfinite(out).all()
    if rank == 0:
        assert torch.equal(out, base)
    upd = (out - base).double().numpy()
    deltas = [(t - base).double().numpy() for t in fts]
    for side, mats in ((upd, np.concatenate(deltas, axis=1)), (upd.T, np.concatenate(deltas, axis=0).T)):
        q = np_svd(mats)[0][:, : np.linalg.matrix_rank(mats)] if mats.any() else np.zeros((len(mats), 0))
        np.testing.assert_allclose(side - q @ (q.T @ side), 0, atol=1e-4 * (1 + np.abs(upd).max()))


# ---- parameters, errors, registry, API ------------------------------------------------------------

def test_registry_defaults():
    assert get_method("tsv").describe()["parameters"]["rank_fraction"]["default"] is None
    assert get_method("iso_cts").describe()["parameters"]["common_space_fraction"]["default"] == 0.8
    for name in METHODS:
        spec = get_method(name)
        assert spec.needs_base and spec.describe()["parameters"]["alpha"]["default"] == 1.0


def test_errors_name_what_to_fix():
    base, fts = random_tasks(3, (6, 6), seed=22)
    with pytest.raises(RecipeError, match="rank_fraction"):
        merge("tsv", fts, base, rank_fraction=0.5)
    with pytest.raises(MergeError, match="base_model"):
        merge("iso_c", fts, None)
    with pytest.raises(ShapeMismatch, match="iso_cts"):
        merge("iso_cts", fts, torch.zeros(6, 5))
    with pytest.raises(ValidationError):
        get_method("iso_cts").shared_params(common_space_fraction=1.5)
    with pytest.raises(ValidationError):
        get_method("tsv").shared_params(alpah=1.0)


def test_merge_state_dicts_routes_matrices_and_vectors():
    base, fts = random_tasks(2, (6, 4), seed=23)
    bias_base, bias_fts = random_tasks(2, (4,), seed=24)
    out = mergelab.merge_state_dicts(
        "tsv", [{"w": w, "b": b} for w, b in zip(fts, bias_fts)],
        base={"w": base, "b": bias_base}, alpha=0.5,
    )
    torch.testing.assert_close(out["w"], merge("tsv", fts, base, alpha=0.5))
    mean_delta = ((bias_fts[0] - bias_base) + (bias_fts[1] - bias_base)) / 2
    torch.testing.assert_close(out["b"], bias_base + 0.5 * mean_delta)
