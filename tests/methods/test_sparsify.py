"""Sparsified merges: primitives by hand, methods by hand, against MergeKit 0.1.5, and invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch.testing import assert_close

from mergelab.errors import MergeError
from mergelab.methods import REGISTRY, PerModel
from mergelab.methods.sparsify import (
    della_keep_probabilities,
    disjoint_mean,
    drop_random,
    elect_sign,
    keep_count,
    keep_magnitude_band,
    keep_top_magnitude,
    rescale_to_norm,
    top_k_mask,
)

FAST = settings(max_examples=25, deadline=None)
TASK_VECTOR_METHODS = [
    "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
]
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def merge(name, x, base, models, seed=None, **shared):
    """Run a registered method; models: one dict of per-model parameters per row of x."""
    spec = REGISTRY[name]
    p = PerModel([spec.model_params(**m) for m in models])
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return spec.fn(x, base, p, spec.shared_params(**shared), gen)


def mergekit_merge(name, x, base, models, seed=None, **shared):
    """The same merge by MergeKit 0.1.5, its random draws from the global generator seeded alike."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    ids = [f"m{i}" for i in range(len(x))]
    group = TensorGroup.from_tensors([base, *x], ids=["base", *ids], base_index=0)
    params = dict(shared)
    for key in {k for m in models for k in m}:
        params[key] = {i: m[key] for i, m in zip(ids, models)}
    with torch.random.fork_rng():
        torch.manual_seed(seed or 0)
        return registry.get(name)([group], parameters=params)[0]


# ----------------------------------------------------------------------------- primitives


def test_keep_count_uses_the_decimal_written():
    assert keep_count(0.29, 100) == 29  # float arithmetic (and MergeKit) gives 28
    assert keep_count(0.5, 7) == 3
    assert keep_count(0.1, 5) == 1  # a positive share keeps at least one entry
    assert keep_count(0.0, 5) == 0 and keep_count(0.5, 0) == 0


def test_top_k_mask_exact_k_and_ties_to_lower_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    assert top_k_mask(scores, 2).tolist() == [False, True, True, False, False]
    assert top_k_mask(scores, 4).tolist() == [True, True, True, True, False]
    assert top_k_mask(torch.zeros(2, 3), 4).view(-1).tolist() == [True] * 4 + [False] * 2
    assert not top_k_mask(scores, 0).any() and top_k_mask(scores, 5).all()


@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), k=st.integers(0, 40), levels=st.integers(1, 5))
def test_top_k_mask_matches_a_stable_sort(seed, n, k, levels):
    # Second formula: rank by a stable descending sort (ties keep index order), take the first k.
    scores = torch.randint(0, levels, (n,), generator=torch.Generator().manual_seed(seed)).float()
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    assert torch.equal(top_k_mask(scores, k), expected)


def test_keep_top_magnitude_by_hand():
    t = torch.tensor([[0.5, -3.0], [2.0, 0.1]])
    assert keep_top_magnitude(t, 0.5).tolist() == [[False, True], [True, False]]


def test_keep_magnitude_band_by_hand():
    t = torch.tensor([0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.05, -0.4, 0.6, 1.0])
    # k = 5, the 2 largest (1.0, -0.9) are outliers, then the 5 next: 0.7, 0.6, 0.5, 0.4, 0.3
    assert torch.nonzero(keep_magnitude_band(t, 0.5, 0.2)).view(-1).tolist() == [2, 3, 4, 7, 8]
    # gamma 0 removes no outliers: the top half
    assert torch.nonzero(keep_magnitude_band(t, 0.5, 0.0)).view(-1).tolist() == [1, 2, 4, 8, 9]
    # density 0.9 leaves room for one outlier only
    assert torch.nonzero(~keep_magnitude_band(t, 0.9, 0.2)).view(-1).tolist() == [9]
    # one entry: kept (MergeKit's floor would keep none)
    assert keep_magnitude_band(torch.tensor([2.0]), 0.9, 0.0).tolist() == [True]


def test_della_keep_probabilities_by_hand():
    assert_close(della_keep_probabilities(torch.tensor([0.1, -0.4, 0.3]), 0.5, 0.1), torch.tensor([0.4, 0.6, 0.5]))
    assert_close(della_keep_probabilities(torch.tensor([[3.0, 1.0], [1.0, 3.0]]), 0.5, 0.1),
                 torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    # Ranks run along dim 1 for 3-D tensors, as in MergeKit: here over the middle axis.
    t = torch.tensor([[[1.0, 5.0], [3.0, 4.0], [2.0, 6.0]]])
    assert_close(della_keep_probabilities(t, 0.5, 0.2), torch.tensor([[[0.3, 0.5], [0.7, 0.3], [0.5, 0.7]]]))
    # One-entry rows (MergeKit divides by zero) keep with probability density.
    assert_close(della_keep_probabilities(randn(4, 1), 0.3, 0.1), torch.full((4, 1), 0.3))
    assert_close(della_keep_probabilities(torch.tensor(2.0), 0.3, 0.1), torch.tensor(0.3))


def test_rescale_to_norm_by_hand():
    kept = torch.tensor([0.0, -1.0, 2.0, 0.0])
    assert_close(rescale_to_norm(kept, torch.tensor(4.0)), torch.tensor([0.0, -4 / 3, 8 / 3, 0.0]))
    assert torch.equal(rescale_to_norm(torch.zeros(3), 5.0), torch.zeros(3))  # nothing left: unchanged


def test_elect_sign_and_disjoint_mean_by_hand():
    d = torch.tensor([[1.0, -2.0, 0.0], [-3.0, 1.0, 0.0], [1.0, 0.5, 0.0]])
    sign = elect_sign(d)
    assert sign.tolist() == [-1.0, -1.0, 1.0]  # zero sum elects +
    w = torch.tensor([1.0, 2.0, 4.0])
    # entry 0 agrees with row 1 only; entry 1 with row 0 only; entry 2 with nobody -> 0
    assert_close(disjoint_mean(d, sign, w), torch.tensor([-3.0 / 2, -2.0 / 1, 0.0]))
    assert_close(disjoint_mean(d, sign, w, normalize=False), torch.tensor([-3.0, -2.0, 0.0]))


def test_drop_random_is_bernoulli_and_reproducible():
    like = torch.zeros(20000)
    a = drop_random(like, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a, drop_random(like, 0.3, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, drop_random(like, 0.3, torch.Generator().manual_seed(6)))
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert abs(a.mean().item() - 0.3) < 5 * (0.3 * 0.7 / 20000) ** 0.5


# ----------------------------------------------------------------------------- methods by hand

# base + these task vectors; worked through in test_ties_by_hand
TAUS = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.5, 1.0, 0.25, 2.0], [0.5, 3.0, -1.0, -0.5]])
TIES_MODELS = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.75}, {"weight": 1.0, "density": 0.5}]


def test_ties_by_hand():
    base = torch.ones(4)
    # trim: [0, -2, 0, 3], [-1.5, 1, 0, 2], [0, 3, -1, 0]; weighted: row 1 halved
    # elect: sum [-0.75, 1.5, -1, 4] -> signs [-, +, -, +]
    # agreeing sums [-0.75, 3.5, -1, 4] over agreeing weights [0.5, 1.5, 1, 1.5]
    out = merge("ties", base + TAUS, base, TIES_MODELS)
    assert_close(out, base + torch.tensor([-1.5, 7 / 3, -1.0, 8 / 3]))
    out = merge("ties", base + TAUS, base, TIES_MODELS, normalize=False, **{"lambda": 0.5})
    assert_close(out, base + 0.5 * torch.tensor([-0.75, 3.5, -1.0, 4.0]))


def test_breadcrumbs_by_hand():
    base = torch.zeros(4)
    models = [{"weight": 1.0, "density": 0.5, "gamma": 0.25}, {"weight": 2.0, "density": 0.25, "gamma": 0.25}]
    # row 0 |.| = 1, 2, 0.5, 3: drop 3, keep 2 and 1; row 1: drop 2, keep 1.5
    out = merge("breadcrumbs", TAUS[:2], base, models)
    assert_close(out, torch.tensor([1.0, -2.0, 0.0, 0.0]) + 2 * torch.tensor([-1.5, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("name,same_as,extra", [
    ("dare_linear", "task_arithmetic", {}), ("della_linear", "task_arithmetic", {}),
    ("dare_ties", "ties", {"normalize": False}), ("della", "ties", {"normalize": True}),
    ("breadcrumbs", "task_arithmetic", {}), ("breadcrumbs_ties", "ties", {"normalize": False}),
])
def test_density_one_is_the_unsparsified_method(name, same_as, extra):
    x, base = randn(3, 6, 5), randn(6, 5, seed=1)
    models = [{"weight": w} for w in (0.5, 0.3, 0.9)]
    assert_close(merge(name, x, base, models, seed=0), merge(same_as, x, base, models, **extra))


def test_dare_rescale_keeps_l1_norm_and_expectation():
    tau, base = randn(1, 200), torch.zeros(200)
    outs = torch.stack([merge("dare_linear", tau, base, [{"weight": 1.0, "density": 0.5}], seed=s)
                        for s in range(2000)])
    assert_close(outs.abs().sum(dim=1), tau.abs().sum().expand(2000))  # each draw: L1 norm restored
    # Mean over seeds ~ tau: Bernoulli noise (5 standard errors) plus the small bias of L1 rescaling.
    err = (outs.mean(dim=0) - tau[0]).abs()
    assert (err <= 5 * tau[0].abs() / 2000**0.5 + 0.03 * tau[0].abs()).all()


def test_della_keeps_entries_with_their_rank_probability():
    tau, base = randn(1, 2, 50), torch.zeros(2, 50)
    kept = torch.stack([merge("della_linear", tau, base, [{"weight": 1.0, "density": 0.5, "epsilon": 0.3}],
                              seed=s, rescale=False) != 0 for s in range(2000)]).float()
    probs = della_keep_probabilities(tau[0], 0.5, 0.3)
    assert ((kept.mean(dim=0) - probs).abs() <= 5 * (probs * (1 - probs) / 2000).sqrt()).all()


# ----------------------------------------------------------------------------- against MergeKit

PARITY_MODELS = [
    {"weight": 0.6, "density": 0.3, "gamma": 0.05, "epsilon": 0.1},
    {"weight": 0.4, "density": 0.8, "gamma": 0.1, "epsilon": 0.15},
    {"weight": -0.5, "density": 1.0, "gamma": 0.0, "epsilon": 0.2},
]


def _params_of(name, models):
    fields = REGISTRY[name].model_params.model_fields
    return [{k: v for k, v in m.items() if k in fields} for m in models]


def our_masks(name, x, base, models, seed):
    """The keep masks our random methods draw, one per model with density < 1, in model order."""
    from mergelab.methods.counter_rng import keep_mask

    def probability(i, m):
        if name.startswith("della"):
            return della_keep_probabilities(x[i] - base, m["density"], m.get("epsilon", 0.15))
        return m["density"]

    return [keep_mask(base.shape, probability(i, m), seed, i) for i, m in enumerate(models) if m["density"] < 1]


def mergekit_with_masks(monkeypatch, name, x, base, models, seed, **shared):
    """MergeKit's merge with our masks in place of its torch.bernoulli draws (one call per thinned model).

    MergeKit draws from torch's global generator, so its masks cannot equal ours; handing it
    our masks checks everything else (DELLA's probabilities aside: the draw replaces them)
    exactly: rescaling, weighting, sign election, normalisation.
    """
    masks = iter(our_masks(name, x, base, models, seed))

    def bernoulli(probs, *args, **kwargs):
        mask = next(masks)
        assert mask.numel() == probs.numel()  # MergeKit's della views a 1-D tensor as one row
        return mask.reshape(probs.shape).to(probs.dtype)

    with monkeypatch.context() as m:
        m.setattr(torch, "bernoulli", bernoulli)
        out = mergekit_merge(name, x, base, models, seed=seed, **shared)
    assert next(masks, None) is None  # every mask was used
    return out


@pytest.mark.mergekit
@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
@pytest.mark.parametrize("shape", [(96,), (12, 16), (3, 8, 4)])
@pytest.mark.parametrize("shared", [{}, {"normalize": True, "rescale": True, "lambda": 1.3, "int8_mask": True}])
def test_matches_mergekit(name, shape, shared, monkeypatch):
    # Deterministic methods match MergeKit exactly. Random ones draw their masks from our
    # counter-based generator, MergeKit from torch's global one; with MergeKit handed our
    # masks, the rest of the pipeline must match exactly (the draws' distribution is
    # compared in test_random_masks_match_mergekit_in_distribution).
    x, base = randn(3, *shape, seed=1), randn(*shape, seed=2)
    models = _params_of(name, PARITY_MODELS)
    if name in RANDOM:
        want = mergekit_with_masks(monkeypatch, name, x, base, models, 7, **shared)
    else:
        want = mergekit_merge(name, x, base, models, **shared)
    assert_close(merge(name, x, base, models, seed=7 if name in RANDOM else None, **shared), want)


@pytest.mark.mergekit
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della_linear"])
def test_random_masks_match_mergekit_in_distribution(name):
    # One model, 4000 entries, 150 seeds per tool: per draw, the kept fraction of each tool
    # lies within binomial bounds of the density and the L1 norm is restored; for DARE the
    # mean of each entry over the draws is unbiased (E[output] ~ tau) for both tools; and
    # the two tools' per-entry means agree within their standard errors.
    n, seeds, density = 4000, 150, 0.3
    tau, base = randn(1, n, seed=5), torch.zeros(n)
    models = _params_of(name, [{"weight": 1.0, "density": density, "epsilon": 0.1}])
    ours = torch.stack([merge(name, tau, base, models, seed=s) for s in range(seeds)])
    theirs = torch.stack([mergekit_merge(name, tau, base, models, seed=s) for s in range(seeds)])
    for out in (ours, theirs):
        kept = (out != 0).float().mean(dim=1)  # (seeds,) kept fraction of each draw
        bound = 5 * (density * (1 - density) / n) ** 0.5
        assert ((kept - density).abs() < bound).all()
        assert_close(out.abs().sum(dim=1), tau.abs().sum().expand(seeds))  # L1 norm restored, each draw
        if name.startswith("dare"):  # DELLA's uniform L1 rescale of rank-dependent draws is biased by design
            # each entry's mean over draws ~ tau (Bernoulli spread: sd tau sqrt((1-p)/p) / sqrt(seeds))
            z = (out.mean(dim=0) - tau[0]) / (tau[0].abs() * ((1 - density) / density / seeds) ** 0.5 + 1e-12)
            assert z.abs().mean() < 1.0 and z.mean().abs() < 0.1  # |z| of a unit normal averages 0.8
    spread = ours.std(dim=0) + theirs.std(dim=0)
    diff = (ours.mean(dim=0) - theirs.mean(dim=0)) / (spread / seeds ** 0.5 + 1e-12)
    assert diff.abs().mean() < 1.0
    # The two tools' kept fractions have the same distribution: compare their means and spreads.
    k_ours, k_theirs = (ours != 0).float().mean(dim=1), (theirs != 0).float().mean(dim=1)
    assert abs(k_ours.mean() - k_theirs.mean()) < 5 * (density * (1 - density) / n / seeds * 2) ** 0.5
    assert 0.7 < float(k_ours.std() / k_theirs.std()) < 1.4


@pytest.mark.mergekit
@pytest.mark.parametrize("shared", [{}, {"select_topk": 0.5}, {"select_topk": 0.1, "int8_mask": True}])
@pytest.mark.parametrize("shape", [(96,), (12, 16)])
def test_sce_matches_mergekit(shared, shape):
    x, base = randn(3, *shape, seed=3), randn(*shape, seed=4)
    assert_close(merge("sce", x, base, [{}] * 3, **shared), mergekit_merge("sce", x, base, [{}] * 3, **shared))


def test_della_one_entry_rows_are_finite():
    # MergeKit raises on the NaN probabilities of one-entry rows; we keep each with p = density.
    x, base = randn(2, 6, 1), randn(6, 1, seed=1)
    out = merge("della", x, base, [{"weight": 1.0, "density": 0.5}] * 2, seed=0)
    assert torch.isfinite(out).all()


def test_sce_weights_scale_with_the_task_vectors():
    # MergeKit switches to uniform weights when sum_i mean(tau_i^2) < 1e-6; ours are scale free.
    base, taus = torch.zeros(4), torch.tensor([[1.0, 2.0, -1.0, 0.0], [3.0, -1.0, -2.0, 1.0]])
    big = merge("sce", taus, base, [{}] * 2)
    assert_close(merge("sce", taus * 1e-4, base, [{}] * 2), big * 1e-4)
    # mean squares 1.5 and 3.75: eta = [6, 15] / 21; elected signs [+, +, -, +].
    # Entry 0: both agree, (6*1 + 15*3)/21; entry 1: model 0 only, 2; entry 2: both,
    # (6*-1 + 15*-2)/21; entry 3: model 1 only, 1.
    assert_close(big, torch.tensor([(6 + 45) / 21, 2.0, -36 / 21, 1.0]))


# ----------------------------------------------------------------------------- parameters


def test_parameters_are_validated():
    spec = REGISTRY["della"]
    with pytest.raises(ValidationError, match="choose epsilon below"):
        spec.model_params(weight=1.0, density=0.9)  # 0.9 + 0.15 >= 1
    assert spec.model_params(weight=1.0, density=1.0).epsilon == 0.15
    with pytest.raises(ValidationError):
        REGISTRY["ties"].model_params(weight=1.0, density=0.0)
    with pytest.raises(ValidationError):
        REGISTRY["ties"].model_params(density=0.5)  # weight is required
    with pytest.raises(ValidationError):
        REGISTRY["ties"].model_params(weight=1.0, gamma=0.1)  # breadcrumbs only
    assert REGISTRY["breadcrumbs"].model_params(weight=1.0).gamma == 0.01
    defaults = {n: (REGISTRY[n].shared_params().normalize, REGISTRY[n].shared_params().rescale)
                for n in TASK_VECTOR_METHODS}
    assert defaults == {"ties": (True, False), "dare_ties": (False, True), "dare_linear": (False, True),
                        "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
                        "della": (True, True), "della_linear": (False, True)}
    assert {n for n in REGISTRY if REGISTRY[n].randomized} >= RANDOM


def test_random_methods_need_a_generator():
    with pytest.raises(MergeError, match="Generator"):
        merge("dare_ties", randn(2, 3), randn(3), [{"weight": 1.0, "density": 0.5}] * 2)


# ----------------------------------------------------------------------------- invariants


def _models(name, draw_density, n):
    return _params_of(name, [{"weight": 0.5 + i / 4, "density": draw_density, "gamma": 0.05, "epsilon": 0.05}
                             for i in range(n)])


@FAST
@given(name=st.sampled_from(TASK_VECTOR_METHODS), seed=st.integers(0, 2**16), n=st.integers(1, 4),
       density=st.sampled_from([0.1, 0.5, 0.9, 1.0]))
def test_zero_task_vectors_are_a_no_op(name, seed, n, density):
    base = randn(4, 5, seed=seed)
    x = torch.cat([base + randn(n, 4, 5, seed=seed + 1), base.expand(1, 4, 5)])
    models = _models(name, density, n + 1)
    # A model equal to the base, merged last, changes nothing: its term is zero, and under
    # normalize (ties, della) zeros never agree with the elected sign, so the divisor is unchanged.
    assert_close(merge(name, x, base, models, seed=seed), merge(name, x[:n], base, models[:n], seed=seed))
    # Only base copies: the base.
    assert torch.equal(merge(name, base.expand(n, 4, 5).clone(), base, models[:n], seed=seed), base)


@FAST
@given(name=st.sampled_from(TASK_VECTOR_METHODS + ["sce"]), seed=st.integers(0, 2**16), n=st.integers(1, 4))
def test_identical_models_give_the_model(name, seed, n):
    model, base = randn(3, 4, seed=seed), randn(3, 4, seed=seed + 1)
    models = [{}] * n if name == "sce" else _models(name, 1.0, n)
    shared = {} if name == "sce" else {"normalize": True}
    assert_close(merge(name, model.expand(n, 3, 4).clone(), base, models, seed=seed, **shared), model)


@FAST
@given(name=st.sampled_from(["ties", "breadcrumbs", "breadcrumbs_ties", "sce"]), seed=st.integers(0, 2**16),
       n=st.integers(2, 4), perm_seed=st.integers(0, 100), density=st.sampled_from([0.2, 0.5, 1.0]))
def test_permuting_models_with_parameters_changes_nothing(name, seed, n, perm_seed, density):
    x, base = randn(n, 5, 6, seed=seed), randn(5, 6, seed=seed + 1)
    models = [{}] * n if name == "sce" else _models(name, density, n)
    shared = {"select_topk": density} if name == "sce" else {}
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    permuted = merge(name, x[perm], base, [models[i] for i in perm], **shared)
    assert_close(permuted, merge(name, x, base, models, **shared))


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS + ["sce"])
def test_same_seed_same_bits_and_inputs_untouched(name):
    x, base = randn(3, 7, 9), randn(7, 9, seed=1)
    x0, b0 = x.clone(), base.clone()
    models = [{}] * 3 if name == "sce" else _models(name, 0.5, 3)
    shared = {"select_topk": 0.5} if name == "sce" else {"rescale": True}
    first = merge(name, x, base, models, seed=11, **shared)
    assert torch.equal(merge(name, x, base, models, seed=11, **shared), first)
    assert torch.equal(x, x0) and torch.equal(base, b0)
    if name in RANDOM:
        assert not torch.equal(merge(name, x, base, models, seed=12, **shared), first)
