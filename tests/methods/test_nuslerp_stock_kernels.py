"""nuslerp and model_stock: the rewritten references against their previous formulas, and the
compiled kernels (methods/kernels/{gram,nuslerp,model_stock}.py) against the references.

The previous formulas are kept below, written as MergeKit 0.1.5 writes them (unit vectors
materialised, sin(omega) divided after combining, products summed with .sum): slow and
readable. What changed in the references is only float order:

- norms and dots are float32 sums of products (sqrt(sum(v * v)), sum(v0 * v1)) instead of
  v.norm() and sum(u0 * u1) with u = v / v.norm(), and nuslerp divides each coefficient by
  sin(omega) before combining. The coefficients then move by a few float32 ulps of the cosine,
  and each output entry by a few ulps of |c0 v0| + |c1 v1|. (On big CPU tensors the old ones
  moved more: torch's float32 norm drifts by up to 6e-3 relative on 65M entries, see
  docs/results-nuslerp-stock-speed.md; the tensors here are small enough for both to be exact
  to a few ulps.)
- the kernels sum in float64 and round once, so they sit closer to the exact value than either
  float32 reference; same bound.

Tolerance used throughout: |got - want| <= 32 * eps32 * (|c0 v0| + |c1 v1| (+ |base|)) entrywise
(c0, c1 in float64), with eps32 = 2^-24 ~ 6e-8, i.e. ~2e-6 relative to the size of the terms
being combined (the worst seen over these tests is 14 ulps, nuslerp at cosines near -0.9;
model_stock 10). 32 ulps covers the cosine's relative error for float32 reductions of up to
~10^5 entries (errors grow like sqrt(n) * eps for pairwise/blocked sums), amplified at most
~12 times through acos/sin for cosines above -0.9 (nearer antipodal SLERP is ill-conditioned
in any float32 formula, see nus_terms), plus 2-3 ulps of the combination itself. A formula
error (a wrong t, a swapped coefficient) is orders of magnitude larger.
"""

from __future__ import annotations

import math

import pytest
import torch

import mergelab
from mergelab.errors import MergeError
from mergelab.methods import PerModel, get_method, run_method
from mergelab.methods.kernels import kernels_disabled

pytest.importorskip("numba", reason="the kernels need numba (pip install mergelab[fast])")

EPS32 = 2.0 ** -24
ULPS = 32


# ---- the previous formulas (kept as slow, readable references) --------------------------------

def old_nuslerp_pair(t, v0, v1, *, row_wise, flatten):
    """mergelab's _nuslerp_pair before this change (MergeKit 0.1.5's formula and float order)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    eps = 1e-8
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_omega = torch.where(colinear, torch.ones_like(cos), torch.sin(omega))
    out = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / sin_omega
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if not flatten and row_wise:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def old_nuslerp(xs, base, w, *, flatten=True, row_wise=False):
    x0, x1 = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in xs)  # float64 stays float64
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    if base is None:
        return old_nuslerp_pair(t, x0, x1, row_wise=row_wise, flatten=flatten)
    b = base.to(x0.dtype)
    return b + old_nuslerp_pair(t, x0 - b, x1 - b, row_wise=row_wise, flatten=flatten)


def old_model_stock(xs, base, *, filter_wise=False):
    """mergelab's model_stock before this change (MergeKit 0.1.5's formula and float order)."""
    x = torch.stack([t.to(torch.promote_types(t.dtype, torch.float32)) for t in xs])  # float64 stays float64
    base = base.to(x.dtype)
    n, shape = x.shape[0], base.shape
    if filter_wise:
        b = base.unsqueeze(0) if base.dim() == 1 else base
        tau = (x.unsqueeze(1) if base.dim() == 1 else x) - b
    else:
        b = base.reshape(-1)
        tau = x.reshape(n, -1) - b
    norms = tau.norm(dim=-1)
    cos = [((tau[i] * tau[j]).sum(-1) / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1, 1)
           for i in range(n) for j in range(i + 1, n)]
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(denom), denom))
    return (t * x.mean(0).reshape(b.shape) + (1 - t) * b).reshape(shape)


# ---- helpers ------------------------------------------------------------------------------------

def run(name, xs, base, model_params=None, *, kernel, out_dtype=torch.float32, **shared):
    """The method as the engine runs it, with its kernel (asserted to apply) or with the reference."""
    spec = get_method(name)
    p = PerModel([spec.model_params(**row) for row in (model_params or [{}] * len(xs))])
    s = spec.shared_params(**shared)
    if kernel:
        assert spec.kernel.supports(xs, base, p, s)
        return run_method(spec, xs, base, p, s, out_dtype=out_dtype)
    with kernels_disabled():
        return run_method(spec, xs, base, p, s, out_dtype=out_dtype)


def nus(xs, base, w, *, kernel, **shared):
    return run("nuslerp", xs, base, [{"weight": w[0]}, {"weight": w[1]}], kernel=kernel, **shared)


def assert_within(got, want, scale, ulps=ULPS):
    """|got - want| <= ulps * eps32 * scale entrywise (scale: the size of the terms summed)."""
    err = (got.double() - want.double()).abs()
    bound = ulps * EPS32 * scale.double() + 1e-30
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1, f"off by {worst:.2f} x the bound ({ulps} ulps of the terms); max error {float(err.max()):.3g}"


def nus_terms(xs, base, t, *, flatten=True, row_wise=False):
    """(scale, ok) entrywise: |c0 v0| + |c1 v1| (+ |base|) with the coefficients in float64, and
    where the vector's cosine is above -0.9. Near antipodal (cos -> -1) SLERP itself is
    ill-conditioned: c0 and c1 grow like 1/sin(omega) and their error in the cosine like
    1/sin^3(omega), so no float32 formula agrees there with another to a fixed number of ulps
    (the exactly antipodal case has its own test). Above -0.9, sin(omega) >= 0.43."""
    b = base.double() if base is not None else 0
    v0, v1 = xs[0].double() - b, xs[1].double() - b
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    norms = (v0.norm(dim=-1, keepdim=True) * v1.norm(dim=-1, keepdim=True)).clamp_min(1e-300)
    cos = ((v0 * v1).sum(-1, keepdim=True) / norms).clamp(-1, 1)
    omega = torch.acos(cos)
    sin = torch.sin(omega).clamp_min(1e-300)
    c0 = torch.where(omega > 0, torch.sin((1 - t) * omega) / sin, torch.full_like(cos, 1 - t))
    c1 = torch.where(omega > 0, torch.sin(t * omega) / sin, torch.full_like(cos, t))
    scale = c0.abs() * v0.abs() + c1.abs() * v1.abs()
    ok = (cos > -0.9).expand_as(v0)
    if not flatten and row_wise:
        scale, ok = scale.transpose(0, -1), ok.transpose(0, -1)
    scale, ok = scale.reshape(shape), ok.reshape(shape)
    return (scale + base.double().abs() if base is not None else scale), ok


def stock_scale(xs, base):
    return sum(x.float().abs() for x in xs) / len(xs) + base.float().abs()


def family(shape, n, seed, dtype, *, spread=0.3):
    """A base and n fine-tunes sharing part of their update (cosines around 0.3-0.5), like real ones."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    common = torch.randn(shape, generator=g)
    xs = [base + spread * (common + torch.randn(shape, generator=g)) for _ in range(n)]
    return [x.to(dtype) for x in xs], base.to(dtype)


SHAPES = [(7,), (33, 40), (3, 5, 9), (2, 5000)]  # (2, 5000): rows longer than the kernel's 4096-entry block
NUS_LAYOUTS = [dict(nuslerp_flatten=True), dict(nuslerp_flatten=False, nuslerp_row_wise=False),
               dict(nuslerp_flatten=False, nuslerp_row_wise=True)]
DTYPES = [torch.float32, torch.bfloat16]


# ---- nuslerp ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("layout", NUS_LAYOUTS, ids=["flat", "rows", "cols"])
@pytest.mark.parametrize("shape", SHAPES)
def test_nuslerp_reference_and_kernel_match_the_previous_formula(shape, layout, with_base, dtype):
    xs, base = family(shape, 2, seed=sum(shape), dtype=dtype)
    base = base if with_base else None
    w = (0.4, 0.6)
    flags = dict(flatten=layout["nuslerp_flatten"], row_wise=layout.get("nuslerp_row_wise", False))
    old = old_nuslerp(xs, base, w, **flags)
    scale, ok = nus_terms(xs, base, 0.6, **flags)
    assert ok.float().mean() > 0.9  # columns of two entries (shape (2, 5000)) can point almost anywhere
    ref = nus(xs, base, w, kernel=False, **layout)
    ker = nus(xs, base, w, kernel=True, **layout)
    assert ref.dtype == ker.dtype == torch.float32
    assert torch.isfinite(ref).all() and torch.isfinite(ker).all()
    assert_within(ref[ok], old[ok], scale[ok])
    assert_within(ker[ok], old[ok], scale[ok])
    assert_within(ker[ok], ref[ok], scale[ok])


def test_nuslerp_kernel_is_closer_to_float64_than_the_bound():
    """Against the formula in float64 (the exact value to ~1e-16), the kernel's float64 sums leave only
    the rounding of c0, c1 to float32 and of the products and sums that combine them: 2.3 ulps of the
    terms at worst here."""
    xs, base = family((64, 300), 2, seed=5, dtype=torch.float32)
    want = old_nuslerp([x.double() for x in xs], base.double(), (1.0, 3.0))
    got = nus(xs, base, (1.0, 3.0), kernel=True)
    scale, ok = nus_terms(xs, base, 0.75)
    assert ok.all()
    assert_within(got, want, scale, ulps=6)


@pytest.mark.parametrize("name", ["nuslerp", "model_stock"])
def test_big_tensor_norms_stay_accurate_in_reference_and_kernel(name):
    """4M entries in one vector: torch's float32 vector_norm drifts by ~3e-5 relative there (some
    400 ulps of the terms); the references' cascade sums and the kernels' float64 sums keep the
    result within the bound of the float64 formula."""
    xs, base = family((2048, 2048), 2, seed=11, dtype=torch.bfloat16, spread=0.05)
    wide = [x.double() for x in xs]
    if name == "nuslerp":
        want = old_nuslerp(wide, base.double(), (0.4, 0.6))
        scale = nus_terms(xs, base, 0.6)[0]
        got = [nus(xs, base, (0.4, 0.6), kernel=k) for k in (False, True)]
    else:
        want = old_model_stock(wide, base.double())
        scale = stock_scale(xs, base)
        got = [run(name, xs, base, kernel=k) for k in (False, True)]
    for g in got:
        assert_within(g, want, scale, ulps=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", NUS_LAYOUTS, ids=["flat", "rows", "cols"])
def test_nuslerp_zero_task_vector(layout, dtype):
    """x_1 = base: v_1 = 0, cos = 0 (the 1e-7 norm floor), omega = pi/2: theta = base + sin(t pi/2) v_2."""
    xs, base = family((6, 10), 2, seed=1, dtype=dtype)
    xs = [base.clone(), xs[1]]
    t = 0.6
    want = base.float() + math.sin(t * math.pi / 2) * (xs[1].float() - base.float())
    scale, _ = nus_terms(xs, base, t)
    for kernel in (False, True):
        got = nus(xs, base, (0.4, 0.6), kernel=kernel, **layout)
        assert_within(got, want, scale, ulps=4)
        assert_within(got, old_nuslerp(xs, base, (0.4, 0.6), flatten=layout["nuslerp_flatten"],
                                       row_wise=layout.get("nuslerp_row_wise", False)), scale, ulps=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", NUS_LAYOUTS, ids=["flat", "rows", "cols"])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_identical_models_give_that_model(layout, with_base, dtype):
    """v_1 = v_2: cos = 1 up to rounding, so either the lerp branch or an angle ~1e-4 whose
    coefficients sum to 1 within O(omega^2): the model back, to a few ulps."""
    xs, base = family((6, 10), 1, seed=2, dtype=dtype)
    pair = [xs[0], xs[0].clone()]
    base = base if with_base else None
    for kernel in (False, True):
        got = nus(pair, base, (1.0, 2.0), kernel=kernel, **layout)
        assert_within(got, xs[0].float(), nus_terms(pair, base, 2 / 3)[0], ulps=8)
    if with_base:  # all task vectors zero: the base itself, exactly
        same = [base.clone(), base.clone()]
        for kernel in (False, True):
            assert torch.equal(nus(same, base, (1.0, 2.0), kernel=kernel, **layout), base.float())


@pytest.mark.parametrize("kernel", [False, True])
def test_nuslerp_exactly_antipodal_takes_the_lerp_branch_in_both_formulas(kernel):
    """v_2 = -v_1 with entries +-0.5 over 16 entries: every norm and dot is exact, cos = -1, so the
    colinear branch (1-t) v_1 + t v_2 runs in the old and new formula alike: equal to the bit."""
    v = torch.tensor([0.5, -0.5] * 8)
    got = nus([v, -v], None, (1.0, 3.0), kernel=kernel)
    assert torch.equal(got, old_nuslerp([v, -v], None, (1.0, 3.0)))
    assert torch.equal(got, 0.25 * v - 0.75 * v)


def test_nuslerp_bfloat16_output_rounds_the_same_float32_value():
    """With bfloat16 out, kernel and reference round float32 values that differ by a few float32
    ulps of the terms: the bfloat16 results are equal but where such a value straddles a rounding
    boundary (one bfloat16 ulp of the value, rarely), or where the terms cancel (an output near 0,
    where a few float32 ulps of the terms exceed its own bfloat16 ulp)."""
    xs, base = family((128, 256), 2, seed=3, dtype=torch.bfloat16)
    spec = get_method("nuslerp")
    p = PerModel([spec.model_params(weight=0.3), spec.model_params(weight=0.7)])
    s = spec.shared_params()
    ker = run_method(spec, xs, base, p, s, out_dtype=torch.bfloat16)
    with kernels_disabled():
        ref = run_method(spec, xs, base, p, s, out_dtype=torch.bfloat16)
    assert ker.dtype == ref.dtype == torch.bfloat16
    assert (ker != ref).float().mean() < 1e-3
    one_ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs()
    terms = ULPS * EPS32 * nus_terms(xs, base, 0.7)[0].float()
    assert ((ker.float() - ref.float()).abs() <= torch.maximum(one_ulp, terms)).all()


def test_nuslerp_three_models_is_an_error_in_every_path():
    xs, base = family((4, 3), 3, seed=4, dtype=torch.float32)
    with pytest.raises(MergeError, match="2 models"):
        mergelab.merge_tensors("nuslerp", xs, weight=[1, 1, 1])
    spec = get_method("nuslerp")
    p = PerModel([spec.model_params(weight=1.0)] * 3)
    assert not spec.kernel.supports(xs, base, p, spec.shared_params())
    with pytest.raises(MergeError, match="2 models"):
        run_method(spec, xs, base, p, spec.shared_params())


def test_nuslerp_kernel_declines_what_it_does_not_cover():
    spec = get_method("nuslerp")
    p = PerModel([spec.model_params(weight=1.0)] * 2)
    s = spec.shared_params()
    a = torch.randn(4, 6)
    assert spec.kernel.supports([a, a], None, p, s)
    assert not spec.kernel.supports([a.half(), a.half()], None, p, s)  # float16: reference
    assert not spec.kernel.supports([a, a.bfloat16()], None, p, s)  # mixed dtypes
    assert not spec.kernel.supports([a.t(), a.t()], None, p, s)  # not contiguous
    assert not spec.kernel.supports([a[:0], a[:0]], None, p, s)  # empty
    assert not spec.kernel.supports([torch.tensor(1.0)] * 2, None, p, spec.shared_params(nuslerp_flatten=False))


# ---- model_stock --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_model_stock_reference_and_kernel_match_the_previous_formula(shape, filter_wise, n, dtype):
    xs, base = family(shape, n, seed=n + sum(shape), dtype=dtype)
    old = old_model_stock(xs, base, filter_wise=filter_wise)
    scale = stock_scale(xs, base)
    ref = run("model_stock", xs, base, kernel=False, filter_wise=filter_wise)
    ker = run("model_stock", xs, base, kernel=True, filter_wise=filter_wise)
    assert_within(ref, old, scale)
    assert_within(ker, old, scale)
    assert_within(ker, ref, scale)


def test_model_stock_two_model_kernel_equals_reference_but_for_t():
    """With two models the kernel's combination is the reference's float32 expression; fed the
    reference's own t it would be bit-equal, so any difference comes from t alone: a few ulps."""
    xs, base = family((64, 300), 2, seed=6, dtype=torch.bfloat16)
    ker = run("model_stock", xs, base, kernel=True, filter_wise=True)
    ref = run("model_stock", xs, base, kernel=False, filter_wise=True)
    assert_within(ker, ref, stock_scale(xs, base), ulps=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_zero_task_vector_keeps_the_base(filter_wise, dtype):
    """tau_1 = 0: cos = 0 (the 1e-6 floor on the norm product), t = 0: the base, exactly."""
    xs, base = family((5, 8), 2, seed=7, dtype=dtype)
    xs = [base.clone(), xs[1]]
    for kernel in (False, True):
        got = run("model_stock", xs, base, kernel=kernel, filter_wise=filter_wise)
        assert torch.equal(got, base.float())
        assert torch.equal(got, old_model_stock(xs, base, filter_wise=filter_wise))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_identical_models_give_that_model(n, filter_wise, dtype):
    """tau_i all equal: cos = 1 (to rounding), t = N / N = 1: the fine-tune itself, to a few ulps."""
    xs, base = family((5, 8), 1, seed=8, dtype=dtype)
    same = [xs[0].clone() for _ in range(n)]
    for kernel in (False, True):
        got = run("model_stock", same, base, kernel=kernel, filter_wise=filter_wise)
        assert_within(got, xs[0].float(), stock_scale(same, base), ulps=8)


def test_model_stock_kernel_declines_what_it_does_not_cover():
    spec = get_method("model_stock")
    p = PerModel([spec.model_params()] * 2)
    a = torch.randn(4, 6)
    assert spec.kernel.supports([a, a], a, p, spec.shared_params())
    assert not spec.kernel.supports([a, a], a.bfloat16(), p, spec.shared_params())
    assert not spec.kernel.supports([a[:0], a[:0]], a[:0], p, spec.shared_params())
    s0 = torch.tensor(1.0)
    assert not spec.kernel.supports([s0, s0], s0, p, spec.shared_params(filter_wise=True))
    assert spec.kernel.supports([s0, s0], s0, p, spec.shared_params())


# ---- the shared Gram pass -----------------------------------------------------------------------

@pytest.mark.parametrize("has_base", [False, True])
def test_gram_rows_and_cols_equal_float64_dot_products(has_base):
    from mergelab.methods.kernels.gram import gram_cols, gram_rows
    from mergelab.methods.kernels.io import as_array

    xs, base = family((9, 4100), 3, seed=9, dtype=torch.bfloat16)  # rows span two 4096-entry blocks
    v = torch.stack([(x.float() - (base.float() if has_base else 0)).double() for x in xs])  # (3, 9, 4100)
    arrays = tuple(as_array(x) for x in xs)
    rows = torch.from_numpy(gram_rows(arrays, as_array(base), has_base, 9, 4100))
    cols = torch.from_numpy(gram_cols(arrays, as_array(base), has_base, 9, 4100))
    for i in range(3):
        for k in range(3):
            if k < i:  # the lower triangle is left zero
                assert not rows[:, i, k].any() and not cols[:, i, k].any()
                continue
            # The same float32 differences; their products are exact in float64: only the float64
            # sums' order differs, ~1e-16 relative.
            torch.testing.assert_close(rows[:, i, k], (v[i] * v[k]).sum(1), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(cols[:, i, k], (v[i] * v[k]).sum(0), rtol=1e-12, atol=1e-12)
