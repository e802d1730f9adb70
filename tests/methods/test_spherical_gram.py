"""multislerp and karcher run on the Gram matrix of the models, against the previous formulas.

The previous implementations (mergelab up to commit 956ceea) are kept below as slow, readable
references: they hold unit vectors and (n, numel) temporaries and pass over them at every step,
in float32, exactly as MergeKit 0.1.5 orders the operations. The current code (methods/spherical.py,
and its numba kernels methods/kernels/gram.py and spherical_mean.py that read bfloat16/float32 as stored) computes every
inner product once, in float64, iterates on n coefficients and writes sum_i k_i v_i in one pass.

Tolerances. Both compute in float32 (eps = 2^-23 = 1.2e-7); the old code rounds every entry of the
mean at each of its steps (up to max_iter + 3 roundings of a unit vector, each up to eps/2 relative),
and its norms and dot products are float32 sums of `numel` products. The new one rounds once to form
the output from float64 coefficients. We allow 3e-6 of the output's largest entry (about 25 ulps at
that scale) plus 2e-6 relative: a few times the float32 rounding the old path accumulates on these
sizes, and more than 100x below any error of the formula (a missed step or a wrong tangent moves
entries by 1e-3 of the output or more here). Kernel and torch path of the new code share the
coefficient code, and give the same numbers to 1 ulp of float32.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mergelab.errors import MergeError
from mergelab.methods import PerModel, get_method, run_method
from mergelab.methods.kernels import kernels_disabled
from mergelab.methods.spherical import gram_matrix
from method_helpers import merge, randn, weights  # noqa: E402


# ---- the previous formulas, kept as references -----------------------------------------------------

def old_multislerp(x, base, w, normalize_weights=True, eps=1e-8):
    """mergelab's multislerp before the Gram rewrite (float32, (n, numel) temporaries)."""
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    v = (x - base if base is not None else x).reshape(n, -1)
    w = torch.tensor(w, dtype=x.dtype)
    if normalize_weights:
        total = float(w.sum())
        if abs(total) < 1e-8:
            raise MergeError("sum to zero")
        w = w / total
    norms = v.norm(dim=-1, keepdim=True)
    units = v / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if n == 2 or bool((norms <= eps).all()):
            out = (v * w.view(-1, 1)).sum(0).reshape(x.shape[1:])
            return out + base if base is not None else out
        raise MergeError("cancel out")
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    g = (tangent * w.view(-1, 1)).sum(0)
    g_norm = g.norm() + eps
    out = mean * torch.cos(g_norm) + g * (torch.sin(g_norm) / g_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).reshape(x.shape[1:])
    return out + base if base is not None else out


def old_karcher(x, max_iter=10, tol=1e-5):
    """mergelab's karcher before the Gram rewrite (float32, (n, numel) temporaries at every step)."""
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    v = x.reshape(n, -1)
    norms = v.norm(dim=-1)
    alphas = [1.0 / n] * n
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(x[0])
    a_valid = torch.tensor([alphas[i] for i in valid], dtype=v.dtype)
    a_valid = a_valid / a_valid.sum()
    units = v[valid] / norms[valid].unsqueeze(-1)
    mean = (units * a_valid.view(-1, 1)).sum(0)
    mean = units[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1, 1)
        omega = torch.arccos(dots)
        moving = omega >= tol
        sin = torch.sin(omega)
        usable = moving & (sin > 1e-6)
        safe_sin = torch.where(usable, sin, torch.ones_like(sin))
        factor = torch.where(usable, omega / safe_sin, torch.zeros_like(omega))
        tangent = ((a_valid * factor).unsqueeze(-1) * (units - dots.unsqueeze(-1) * mean)).sum(0)
        t_norm = tangent.norm()
        if float(t_norm) < tol:
            break
        mean = torch.cos(t_norm) * mean + torch.sin(t_norm) * (tangent / t_norm)
        m_norm = mean.norm()
        if float(m_norm) > tol:
            mean = mean / m_norm
    scale = sum(a * float(nrm) for a, nrm in zip(alphas, norms))
    return (scale * mean).reshape(x.shape[1:])


# ---- inputs -------------------------------------------------------------------------------------------

SHAPE = (64, 48)


def models(n, seed, spread=1.0):
    """n models around a common point; spread scales their differences (1: unrelated directions)."""
    common = randn(*SHAPE, seed=seed + 100)
    return [common + spread * randn(*SHAPE, seed=seed + i) for i in range(n)]


def cases():
    """(id, models): random models, and the degenerate ones the methods must handle."""
    a = randn(*SHAPE, seed=7)
    yield "two", models(2, 1)
    yield "three", models(3, 2)
    yield "five", models(5, 3)
    yield "three_close", models(3, 4, spread=1e-3)  # fine-tunes of one model: small angles
    yield "three_very_close", models(3, 5, spread=3e-5)  # angles near float32's resolution of cos
    yield "norm_zero", [a, torch.zeros(SHAPE), randn(*SHAPE, seed=8)]
    yield "norm_tiny", [a, 1e-9 * randn(*SHAPE, seed=9), randn(*SHAPE, seed=8)]
    yield "antipodal", [a, -a]
    yield "antipodal_and_third", [a, -a, randn(*SHAPE, seed=10)]
    yield "identical", [a, a.clone(), a.clone()]
    yield "all_zero", [torch.zeros(SHAPE)] * 3


CASES = list(cases())
IDS = [c[0] for c in CASES]


def _close(got, want):
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=2e-6, atol=3e-6 * scale + 1e-30)


def _kernel_available():
    try:
        importlib.import_module("mergelab.methods.kernels.gram")
        return True
    except ImportError:
        return False


PATHS = ["kernel", "torch"] if _kernel_available() else ["torch"]


def _run(path, *args, **kwargs):
    if path == "torch":
        with kernels_disabled():
            return merge(*args, **kwargs)
    return merge(*args, **kwargs)


# ---- karcher ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("max_iter", [0, 1, 10])
@pytest.mark.parametrize("case,xs", CASES, ids=IDS)
def test_karcher_equals_the_previous_formula(case, xs, max_iter, path):
    want = old_karcher(torch.stack(xs), max_iter=max_iter)
    got = _run(path, "karcher", xs, max_iter=max_iter)
    if case == "antipodal" and max_iter > 0:
        # No mean direction: both start from the first model's. The new code sees cos = 1 and -1
        # exactly and stops, as MergeKit does on these inputs (checked against it below). The old
        # code's matrix product rounded them to 1 - 2^-24 and -(1 - 2^-24), so the far point lay
        # at omega = pi - 3.4e-4 with omega / sin(omega) ~ 9e3: that factor times the float32
        # rounding of u_1 - <u_1, m> m (a vector of norm ~1e-7 in no particular direction) made
        # a step of ~3e-4 in a random direction. We check the exact answer (the first model) and
        # bound the old code's noise.
        _close(got, xs[0])
        assert float((want - xs[0]).abs().max()) < 2e-3 * float(xs[0].abs().max())
        return
    _close(got, want)


def test_karcher_one_model_and_fifty_iterations():
    a = randn(*SHAPE, seed=3)
    torch.testing.assert_close(merge("karcher", [a]), a, rtol=0, atol=0)
    xs = models(4, 11)
    _close(merge("karcher", xs, max_iter=50, tol=1e-7), old_karcher(torch.stack(xs), 50, 1e-7))


# ---- multislerp ---------------------------------------------------------------------------------------

WEIGHTS = {2: [0.3, 0.7], 3: [0.2, 0.5, 0.3], 5: [1.0, 2.0, 0.5, 0.5, 1.0]}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("case,xs", CASES, ids=IDS)
def test_multislerp_equals_the_previous_formula(case, xs, with_base, path):
    base = randn(*SHAPE, seed=50) if with_base else None
    if with_base:  # the same task vectors around a base
        xs = [base + x for x in xs]
    ws = WEIGHTS[len(xs)]
    try:
        want = old_multislerp(torch.stack(xs), base, ws)
    except MergeError:
        with pytest.raises(MergeError, match="cancel out"):
            _run(path, "multislerp", xs, base, weights(*ws))
        return
    _close(_run(path, "multislerp", xs, base, weights(*ws)), want)


@pytest.mark.parametrize("path", PATHS)
def test_multislerp_unnormalised_weights_and_one_model(path):
    xs = models(3, 21)
    ws = [0.4, -0.3, 1.5]
    want = old_multislerp(torch.stack(xs), None, ws, normalize_weights=False)
    _close(_run(path, "multislerp", xs, None, weights(*ws), normalize_weights=False), want)
    torch.testing.assert_close(_run(path, "multislerp", xs[:1], None, weights(2.0)), xs[0], rtol=0, atol=0)


@pytest.mark.mergekit
def test_karcher_of_antipodal_models_is_mergekits():
    a = randn(*SHAPE, seed=7)
    from method_helpers import mergekit
    for max_iter in (1, 10):
        want = mergekit("karcher", [a, -a], None, max_iter=max_iter, tol=1e-5)
        _close(merge("karcher", [a, -a], max_iter=max_iter), want)


def test_antipodal_pair_with_balancing_weights_is_their_weighted_sum():
    # MergeKit's fallback: |sum_i w_i u_i| = 0 exactly, so the merge is 0.5 a + 0.5 (-a) = 0.
    a = randn(*SHAPE, seed=30)
    torch.testing.assert_close(merge("multislerp", [a, -a], None, weights(1, 1)), torch.zeros(SHAPE))
    with pytest.raises(MergeError, match="cancel out"):
        merge("multislerp", [a, -a, randn(*SHAPE, seed=31)], None, weights(1, 1, 0))


# ---- the Gram matrix and the kernel -------------------------------------------------------------------

def test_gram_matrix_is_the_float64_inner_products():
    xs = torch.stack(models(3, 40))
    base = randn(*SHAPE, seed=41)
    v = (xs - base).reshape(3, -1).double()
    torch.testing.assert_close(gram_matrix(xs, base), v @ v.T, rtol=1e-12, atol=0)
    gk = pytest.importorskip("mergelab.methods.kernels.gram")
    torch.testing.assert_close(gk.gram(list(xs), base), v @ v.T, rtol=1e-12, atol=0)
    torch.testing.assert_close(gk.gram(list(xs)), xs.reshape(3, -1).double() @ xs.reshape(3, -1).double().T,
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["karcher", "multislerp"])
@pytest.mark.parametrize("with_base", [False, True])
def test_kernel_reads_bfloat16_as_the_reference_reads_its_float32_copy(name, with_base):
    pytest.importorskip("mergelab.methods.kernels.gram")
    spec = get_method(name)
    # 70001 entries: more than one block of the kernel, not a multiple of it.
    xs = [randn(70001, seed=60 + i).to(torch.bfloat16) for i in range(3)]
    base = randn(70001, seed=69).to(torch.bfloat16) if with_base else None
    p = PerModel([spec.model_params(**w) for w in (weights(1, 2, 3) if name == "multislerp" else [{}] * 3)])
    s = spec.shared_params()
    for out_dtype in (torch.float32, torch.bfloat16):
        got = run_method(spec, xs, base, p, s, out_dtype=out_dtype)
        with kernels_disabled():
            want = run_method(spec, xs, base, p, s, out_dtype=out_dtype)
        assert got.dtype == want.dtype == out_dtype
        if out_dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7 * float(want.abs().max()))
        else:  # float32 results a few ulps apart may round to neighbouring bfloat16 values
            assert float((got.float() - want.float()).abs().max()) <= 2 ** -7 * float(want.float().abs().max())
            assert (got != want).float().mean() < 1e-3
