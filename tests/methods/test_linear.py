"""Tests of methods/linear.py: linear, model_stock, nearswap, passthrough.

References: hand-worked cases, the formula written a second way (model_stock row by row),
and MergeKit 0.1.5's own methods run on the same tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelab.errors import MergeError
from mergelab.methods import PerModel, get_method
from method_helpers import merge, mergekit, randn, weights  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None)




# ---- registry -----------------------------------------------------------------------------------

def test_registry_flags_as_mergekit():
    specs = {n: get_method(n) for n in ("linear", "model_stock", "nearswap", "passthrough")}
    assert {n for n, s in specs.items() if s.elementwise} == {"linear", "nearswap", "passthrough"}
    assert specs["linear"].base == "ignored" and specs["passthrough"].base == "ignored"
    assert specs["model_stock"].needs_base and specs["model_stock"].min_models == 2
    assert specs["nearswap"].needs_base and specs["nearswap"].max_models == 1
    assert specs["passthrough"].max_models == 1
    # MergeKit has no default for linear's weight nor nearswap's t: they are required here too.
    with pytest.raises(ValidationError):
        specs["linear"].model_params()
    with pytest.raises(ValidationError):
        specs["nearswap"].shared_params()
    with pytest.raises(ValidationError):
        specs["nearswap"].shared_params(t=-0.1)
    assert specs["linear"].shared_params().normalize is True
    assert specs["model_stock"].shared_params().filter_wise is False
    assert specs["passthrough"].model_params().scale is None


# ---- linear -------------------------------------------------------------------------------------

def test_linear_of_three_scalars_by_hand():
    xs = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([4.0])]
    # (1*1 + 2*2 + 1*4) / (1 + 2 + 1) = 9 / 4
    assert merge("linear", xs, model_params=weights(1, 2, 1)).item() == 2.25
    assert merge("linear", xs, model_params=weights(1, 2, 1), normalize=False).item() == 9.0


def test_linear_weights_summing_to_zero_is_an_error_not_a_division_by_zero():
    xs = [torch.ones(3), 2 * torch.ones(3)]
    with pytest.raises(MergeError, match="sum to zero.*normalize: false"):
        merge("linear", xs, model_params=weights(1.0, -1.0))
    # Without normalisation the same weights are a plain difference.
    got = merge("linear", xs, model_params=weights(1.0, -1.0), normalize=False)
    torch.testing.assert_close(got, -torch.ones(3))


@pytest.mark.mergekit
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_mergekit(normalize, dtype):
    xs = [randn(6, 5, seed=i, dtype=dtype) for i in range(3)]
    w = [0.2, 0.7, -0.4]
    got = merge("linear", xs, model_params=weights(*w), normalize=normalize)
    assert got.dtype == dtype
    torch.testing.assert_close(got, mergekit("linear", xs, weight=w, normalize=normalize))


@SETTINGS
@given(st.lists(st.floats(0.01, 5.0), min_size=2, max_size=4), st.integers(0, 2**16))
def test_linear_with_normalised_weights_stays_in_the_convex_hull(ws, seed):
    xs = [randn(4, 3, seed=seed + i) for i in range(len(ws))]
    got = merge("linear", xs, model_params=weights(*ws))
    stack = torch.stack(xs)
    slack = 1e-5
    assert bool((got >= stack.min(0).values - slack).all()) and bool((got <= stack.max(0).values + slack).all())


@SETTINGS
@given(st.lists(st.floats(0.1, 5.0), min_size=2, max_size=4), st.integers(0, 2**16), st.randoms())
def test_linear_is_symmetric_under_permutation(ws, seed, rnd):
    xs = [randn(5, seed=seed + i) for i in range(len(ws))]
    order = list(range(len(ws)))
    rnd.shuffle(order)
    got = merge("linear", [xs[i] for i in order], model_params=weights(*[ws[i] for i in order]))
    torch.testing.assert_close(got, merge("linear", xs, model_params=weights(*ws)))


# ---- nearswap -----------------------------------------------------------------------------------

def test_nearswap_by_hand():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    other = torch.tensor([0.1, 1.0, -4.0, 1.0])
    # w = clamp(0.5 / |diff|): [1 (0.5/0.1 = 5), 0.5, 0.125, 1 (diff 0 floored at 1e-6)]
    got = merge("nearswap", [other], base, t=0.5)
    torch.testing.assert_close(got, torch.tensor([0.1, 0.5, -0.5, 1.0]))
    # t = 0 keeps the base everywhere the models differ.
    torch.testing.assert_close(merge("nearswap", [other], base, t=0.0), base)


@pytest.mark.mergekit
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.3, 10.0])
def test_nearswap_matches_mergekit(t):
    base, other = randn(7, 4, seed=1), randn(7, 4, seed=2)
    torch.testing.assert_close(merge("nearswap", [other], base, t=t), mergekit("nearswap", [base, other], 0, t=t))


# ---- passthrough --------------------------------------------------------------------------------

def test_passthrough_copies_or_scales():
    x = randn(3, 2, seed=3)
    got = merge("passthrough", [x])
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    assert got.data_ptr() != x.data_ptr()  # a copy: the engine may write into it
    torch.testing.assert_close(merge("passthrough", [x], model_params=[{"scale": 0.5}]), x / 2)


@pytest.mark.mergekit
def test_passthrough_matches_mergekit():
    x = randn(4, 3, seed=4)
    torch.testing.assert_close(merge("passthrough", [x], model_params=[{"scale": 1.7}]),
                               mergekit("passthrough", [x], scale=1.7))


# ---- model_stock --------------------------------------------------------------------------------

def test_model_stock_two_models_at_60_degrees_by_hand():
    base = torch.zeros(2)
    t1, t2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    # cos = 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3; mean = (0.75, sqrt3/4); result = 2/3 * mean
    got = merge("model_stock", [t1, t2], base)
    torch.testing.assert_close(got, torch.tensor([0.5, math.sqrt(3) / 6]))


def test_model_stock_orthogonal_and_opposite_updates_keep_the_base():
    base = torch.tensor([1.0, 2.0])
    # Orthogonal: cos = 0 so t = 0. Opposite: 1 + (N-1) cos = 0, no finite ratio; keep the base.
    for t1, t2 in [([1.0, 0.0], [0.0, 1.0]), ([1.0, -1.0], [-1.0, 1.0])]:
        got = merge("model_stock", [base + torch.tensor(t1), base + torch.tensor(t2)], base)
        torch.testing.assert_close(got, base)


def test_model_stock_filter_wise_equals_per_row_model_stock():
    base = randn(4, 6, seed=5)
    fts = [base + 0.1 * randn(4, 6, seed=10 + i) for i in range(3)]
    got = merge("model_stock", fts, base, filter_wise=True)
    for r in range(4):
        row = merge("model_stock", [f[r] for f in fts], base[r])
        torch.testing.assert_close(got[r], row)


@pytest.mark.mergekit
@pytest.mark.parametrize("shape", [(9,), (5, 4), (3, 2, 4)])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_model_stock_matches_mergekit(shape, filter_wise, n):
    base = randn(*shape, seed=6)
    fts = [base + 0.2 * randn(*shape, seed=20 + i) + 0.1 for i in range(n)]
    got = merge("model_stock", fts, base, filter_wise=filter_wise)
    torch.testing.assert_close(got, mergekit("model_stock", [base, *fts], 0, filter_wise=filter_wise))


@SETTINGS
@given(st.integers(2, 4), st.integers(0, 2**16), st.randoms())
def test_model_stock_is_symmetric_under_permutation(n, seed, rnd):
    base = randn(3, 4, seed=seed)
    fts = [base + randn(3, 4, seed=seed + 1 + i) for i in range(n)]
    perm = fts[:]
    rnd.shuffle(perm)
    torch.testing.assert_close(merge("model_stock", perm, base), merge("model_stock", fts, base))


# ---- invariants of the family -------------------------------------------------------------------

CASES = {  # name -> (uses a base, per-model params for N models, shared params)
    "linear": (False, lambda n: weights(*[1.0 + i for i in range(n)]), {}),
    "model_stock": (True, lambda n: None, {"filter_wise": True}),
    "nearswap": (True, lambda n: None, {"t": 0.01}),
    "passthrough": (False, lambda n: [{"scale": None}], {}),
}


@SETTINGS
@given(st.sampled_from(sorted(CASES)), st.integers(1, 4), st.integers(0, 2**16), st.booleans())
def test_identical_models_merge_to_that_model(name, n, seed, base_equal):
    uses_base, params, shared = CASES[name]
    n = 1 if name in ("nearswap", "passthrough") else max(n, 2) if name == "model_stock" else n
    model = randn(3, 5, seed=seed)
    # nearswap's only other model is weighed against the base: identical means the base too.
    base_equal = base_equal or name == "nearswap"
    base = (model.clone() if base_equal else randn(3, 5, seed=seed + 1)) if uses_base else None
    got = merge(name, [model] * n, base, params(n), **shared)
    torch.testing.assert_close(got, model)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inputs_are_not_mutated(name):
    uses_base, params, shared = CASES[name]
    n = 1 if name in ("nearswap", "passthrough") else 3
    x = torch.stack([randn(4, 3, seed=30 + i) for i in range(n)])
    base = randn(4, 3, seed=40) if uses_base else None
    x0, b0 = x.clone(), None if base is None else base.clone()
    spec = get_method(name)
    rows = params(n) or [{}] * n
    spec.fn(x, base, PerModel([spec.model_params(**r) for r in rows]), spec.shared_params(**shared), None)
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    if base is not None:
        torch.testing.assert_close(base, b0, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["linear", "nearswap", "passthrough"])
def test_elementwise_methods_commute_with_row_chunks(name):
    # elementwise=True lets the engine merge a big tensor in row chunks: check the claim.
    uses_base, params, shared = CASES[name]
    n = 1 if name != "linear" else 3
    models = [randn(6, 4, seed=50 + i) for i in range(n)]
    base = randn(6, 4, seed=60) if uses_base else None
    full = merge(name, models, base, params(n), **shared)
    parts = [merge(name, [m[i:i + 2] for m in models], None if base is None else base[i:i + 2], params(n), **shared)
             for i in range(0, 6, 2)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=0)
