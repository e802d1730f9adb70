"""Metric-weighted merges: the issue's 2-D example, identity-metric reductions, least squares, bad stats."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from mergelab.errors import MergeError, StatsError
from mergelab.methods import REGISTRY, PerModel
from mergelab.methods import preconditioned as pc
from mergelab.methods import gradient_matching as gm

FAST = settings(max_examples=25, deadline=None)
DIAGONAL = ("preconditioned", "optimizer_aware", "fisher")


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def per_model(n, weights=None, cls=pc.MetricWeight, **kw):
    weights = weights if weights is not None else [1.0] * n
    return PerModel([cls(weight=w, **kw) for w in weights])


def run(method, x, stats, weights=None, base=None, **shared):
    spec = REGISTRY[method]
    p = per_model(x.shape[0], weights, spec.model_params)
    return spec.fn(x, base, p, spec.shared_params(**shared), None, stats=stats)


def objective_by_matrices(theta, models, metrics):
    """J written with explicit diagonal matrices, independently of pc.weighted_objective."""
    total = 0.0
    for th_k, g_k in zip(models, metrics):
        d = (theta - th_k).reshape(-1, 1)
        total += float(d.T @ torch.diag(g_k) @ d)
    return total


def test_the_issue_example_in_float64():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    g = torch.tensor([[100.0, 1.0], [1.0, 100.0]], dtype=torch.float64)
    for method in ("preconditioned", "optimizer_aware"):
        theta = run(method, x, g)
        # By hand: coordinate 0 = (100*0 + 1*1) / 101, coordinate 1 = (1*0 + 100*1) / 101.
        assert theta.tolist() == [1 / 101, 100 / 101]
    midpoint = x.mean(0)
    assert objective_by_matrices(midpoint, x, g) == 50.5
    assert abs(objective_by_matrices(theta, x, g) - 200 / 101) < 1e-15  # 1.980...
    assert round(objective_by_matrices(theta, x, g), 2) == 1.98
    assert float(pc.weighted_objective(midpoint, x, g)) == 50.5
    assert abs(float(pc.weighted_objective(theta, x, g)) - 200 / 101) < 1e-15


@FAST
@given(st.integers(0, 10_000), st.lists(st.floats(0.1, 3.0), min_size=2, max_size=4))
def test_identity_metrics_give_the_weighted_average(seed, weights):
    x = randn(len(weights), 3, 4, seed=seed)
    w = torch.tensor(weights)
    expected = (w.view(-1, 1, 1) * x).sum(0) / w.sum()
    ones = torch.ones_like(x)
    for method in DIAGONAL:
        assert_close(run(method, x, ones, weights), expected, rtol=1e-5, atol=1e-6)
    assert_close(run("regmean", x, torch.eye(4).expand(len(weights), 4, 4), weights, alpha=1.0), expected,
                 rtol=1e-5, atol=1e-5)
    assert_close(run("regmean", x, None, weights), expected, rtol=1e-5, atol=1e-6)


@FAST
@given(st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_invariants(seed, scale):
    x, g = randn(3, 5, seed=seed), randn(3, 5, seed=seed + 1).abs() + 0.1
    merged = run("preconditioned", x, g)
    assert_close(run("preconditioned", x, g * scale), merged, rtol=1e-4, atol=1e-5)  # metric units cancel
    perm = torch.tensor([2, 0, 1])
    assert_close(run("preconditioned", x[perm], g[perm]), merged, rtol=1e-5, atol=1e-6)
    assert_close(run("preconditioned", x[:1].expand(3, 5), g), x[0], rtol=1e-5, atol=1e-6)  # copies
    # The merge minimises J: moving any coordinate away from it makes J larger.
    j = objective_by_matrices(merged.double(), x.double(), g.double())
    for k in range(5):
        bumped = merged.double().clone()
        bumped[k] += 1e-2
        assert objective_by_matrices(bumped, x.double(), g.double()) > j


def test_inputs_are_not_mutated():
    x, g, base = randn(2, 3, 4), randn(2, 3, 4, seed=1).abs(), randn(3, 4, seed=2)
    grams = torch.stack([a.T @ a for a in randn(2, 6, 4, seed=3)])
    copies = [t.clone() for t in (x, g, base, grams)]
    for method in DIAGONAL:
        run(method, x, g)
    run("regmean", x, grams)
    REGISTRY["gradient_matching"].fn(x, base, per_model(2, cls=gm.GradientMatchingParams),
                                     gm.GradientMatchingShared(), None, stats=g, base_stats=g[0])
    for before, after in zip(copies, (x, g, base, grams)):
        assert torch.equal(before, after)


def test_fisher_normalisation_and_floor():
    x = torch.tensor([[0.0, 4.0], [2.0, 0.0]])
    f = torch.tensor([[1.0, 3.0], [10.0, 30.0]])  # model 1's Fisher is model 0's times 10
    # Unnormalised: (1*0 + 10*2) / 11 = 20/11; (3*4 + 30*0) / 33 = 4/11.
    assert_close(run("fisher", x, f), torch.tensor([20 / 11, 4 / 11]))
    # Normalised by L2 norm the two Fishers are equal, so the result is the plain average.
    assert_close(run("fisher", x, f, normalize_fisher=True), torch.tensor([1.0, 2.0]))
    with pytest.warns(pc.MetricFloorWarning, match="model 0: 2, model 1: 2"):
        assert_close(run("fisher", x, torch.zeros(2, 2)), torch.tensor([1.0, 2.0]))
    with pytest.warns(pc.MetricFloorWarning, match="model 0: 1, model 1: 2"):  # all-zero: not divided by 0
        out = run("fisher", x, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), normalize_fisher=True)
    # Model 0's normalised Fisher is (1, 0) -> floored (1, 1e-6); model 1's is floored everywhere.
    assert_close(out, torch.tensor([2e-6 / (1 + 1e-6), 2.0]))


def test_weights():
    x = torch.tensor([[0.0], [1.0]])
    g = torch.tensor([[1.0], [3.0]])
    # (2*1*0 + 1*3*1) / (2*1 + 1*3) = 3/5
    assert_close(run("preconditioned", x, g, [2.0, 1.0]), torch.tensor([0.6]))
    with pytest.raises(MergeError, match="weight 0"):
        run("preconditioned", x, g, [0.0, 0.0])


@pytest.mark.parametrize("method", DIAGONAL)
def test_bad_metrics_are_refused(method):
    x = randn(2, 3, 4)
    g = torch.ones_like(x)
    bad = g.clone()
    bad[1, 0, :2] = float("nan")
    with pytest.raises(StatsError, match=r"model 1 has 2 non-finite"):
        run(method, x, bad)
    neg = g.clone()
    neg[0, 1, 1] = -1
    with pytest.raises(StatsError, match="model 0 has 1 negative"):
        run(method, x, neg)
    with pytest.raises(StatsError, match=r"shape \(2, 4, 3\)"):
        run(method, x, torch.ones(2, 4, 3))
    with pytest.raises(StatsError, match="needs one"):
        run(method, x, None)


def lstsq_problem(seed=0, d=4, out=3, sizes=(30, 20)):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, d)) + rng.normal(size=d) for n in sizes]  # datasets with different means
    ys = [x @ rng.normal(size=(d, out)) + 0.1 * rng.normal(size=(x.shape[0], out)) for x in xs]
    ws = [np.linalg.lstsq(x, y, rcond=None)[0].T for x, y in zip(xs, ys)]  # each model's (out, d) weight
    union = np.linalg.lstsq(np.vstack(xs), np.vstack(ys), rcond=None)[0].T
    return xs, ws, union


def test_regmean_is_least_squares_on_the_union_of_the_data():
    xs, ws, union = lstsq_problem()
    x = torch.tensor(np.stack(ws), dtype=torch.float64)
    sums = torch.tensor(np.stack([a.T @ a for a in xs]), dtype=torch.float64)
    assert_close(run("regmean", x, sums, alpha=1.0), torch.tensor(union), rtol=1e-10, atol=1e-10)
    # Mean Grams (what gram_matrices stores) weighted by each model's row count: the same problem.
    means = sums / torch.tensor([30.0, 20.0], dtype=torch.float64).view(-1, 1, 1)
    assert_close(run("regmean", x, means, [30.0, 20.0], alpha=1.0), torch.tensor(union), rtol=1e-10, atol=1e-10)
    # Stored (in, out) like transformers' Conv1D: the same numbers, transposed.
    assert_close(run("regmean", x.transpose(1, 2), sums, alpha=1.0, transposed=True), torch.tensor(union).T,
                 rtol=1e-10, atol=1e-10)


def test_regmean_alpha_zero_is_a_per_column_diagonal_mean():
    x = randn(3, 5, 4, seed=4)
    grams = torch.stack([a.T @ a for a in randn(3, 9, 4, seed=5)])
    diag = grams.diagonal(dim1=1, dim2=2)  # (3, 4): one metric per input column
    expected = run("preconditioned", x, diag.unsqueeze(1).expand(3, 5, 4))
    assert_close(run("regmean", x, grams, alpha=0.0), expected, rtol=1e-5, atol=1e-6)


def test_regmean_singular_gram_takes_the_average_where_no_input_reaches():
    xs, ws, _ = lstsq_problem(seed=1)
    xs = [np.hstack([a, np.zeros((a.shape[0], 1))]) for a in xs]  # a fifth input that is always 0
    ws = [np.hstack([w, np.full((w.shape[0], 1), float(i + 1))]) for i, w in enumerate(ws)]
    union = np.linalg.lstsq(np.vstack(xs)[:, :4], np.vstack([a[:, :4] @ w[:, :4].T for a, w in zip(xs, ws)]),
                            rcond=None)[0].T
    x = torch.tensor(np.stack(ws), dtype=torch.float32)
    sums = torch.tensor(np.stack([a.T @ a for a in xs]), dtype=torch.float32)
    with pytest.warns(pc.MetricFloorWarning, match="singular"):
        out = run("regmean", x, sums, alpha=1.0)
    assert_close(out[:, 4], torch.full((3,), 1.5))  # the weights of the dead input: average of 1 and 2
    assert_close(out[:, :4], torch.tensor(union, dtype=torch.float32), rtol=1e-3, atol=1e-3)


def test_regmean_bad_grams():
    x = randn(2, 3, 4)
    with pytest.raises(StatsError, match="set `transposed: true`"):
        run("regmean", x, torch.ones(2, 3, 3))
    with pytest.raises(StatsError, match=r"needs \(2, 4, 4\)"):
        run("regmean", x, torch.ones(2, 5, 5))
    bad = torch.eye(4).repeat(2, 1, 1)
    bad[0, 0, 1] = float("inf")
    with pytest.raises(StatsError, match="model 0 has 1 non-finite"):
        run("regmean", x, bad)
    with pytest.raises(StatsError, match="only 2-D linear weights"):
        run("regmean", randn(2, 4), torch.ones(2, 4, 4))


def gradient_matching(x, base, stats, weights, base_stats=None, **shared):
    p = PerModel([gm.GradientMatchingParams(weight=w) for w in weights])
    return gm.gradient_matching(x, base, p, gm.GradientMatchingShared(**shared), None, stats=stats,
                                base_stats=base_stats)


def task_arithmetic(x, base, weights):
    """theta_0 + sum_t a_t tau_t, written out."""
    return base + sum(w * (xi - base) for w, xi in zip(weights, x))


@FAST
@given(st.integers(0, 10_000), st.lists(st.floats(0.05, 2.0), min_size=2, max_size=4))
def test_gradient_matching_reduces_to_task_arithmetic(seed, weights):
    n = len(weights)
    x, base = randn(n, 6, seed=seed), randn(6, seed=seed + 1)
    # A prior alone (H_t = 0, H_0 = h0 I): exactly task arithmetic, whatever the weights.
    assert_close(gradient_matching(x, base, torch.zeros(n, 6), weights, h0=1.0), task_arithmetic(x, base, weights),
                 rtol=1e-5, atol=1e-5)
    # H_0 = H_t = I with weights summing to 1: task arithmetic with those weights.
    a = [w / sum(weights) for w in weights]
    assert_close(gradient_matching(x, base, torch.ones(n, 6), a, base_stats=torch.ones(6)),
                 task_arithmetic(x, base, a), rtol=1e-5, atol=1e-5)
    # No prior: Fisher merging of the task models.
    h = randn(n, 6, seed=seed + 2).abs() + 0.1
    assert_close(gradient_matching(x, base, h, weights), run("fisher", x, h, weights, fisher_floor=1e-12),
                 rtol=1e-4, atol=1e-5)


def test_gradient_matching_hand_worked():
    base = torch.tensor([0.0])
    x = torch.tensor([[2.0], [4.0]])
    h = torch.tensor([[1.0], [3.0]])
    # H_0 = 2 (base stats 1 x prior_weight 1 + h0 1), a = (1, 0.5):
    # Hbar = 2 + 1*1 + 0.5*3 = 4.5; sum_t a_t (H_0 + H_t) tau_t = 1*3*2 + 0.5*5*4 = 16; theta = 16/4.5.
    out = gradient_matching(x, base, h, [1.0, 0.5], base_stats=torch.tensor([1.0]), h0=1.0)
    assert_close(out, torch.tensor([16 / 4.5]))
    with pytest.raises(StatsError, match="base metric of model 0 has 1 non-finite"):
        gradient_matching(x, base, h, [1.0, 1.0], base_stats=torch.tensor([float("nan")]))
    with pytest.raises(MergeError, match="base model"):
        gradient_matching(x, None, h, [1.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradient_matching(x, base, torch.zeros(2, 1), [1.0, 1.0], h0=1.0)  # a prior: nothing floored


def test_registry():
    for name in (*DIAGONAL, "regmean", "gradient_matching"):
        assert REGISTRY[name].needs_stats
    for name in ("fisher", "regmean", "gradient_matching"):
        assert "arXiv" in REGISTRY[name].doc
    assert REGISTRY["gradient_matching"].needs_base
    # Per-tensor normalisation and the Gram solve need the whole tensor: no row chunks for those.
    assert REGISTRY["preconditioned"].elementwise and not REGISTRY["fisher"].elementwise
    assert not REGISTRY["regmean"].elementwise
    assert REGISTRY["regmean"].shared_params().alpha == 0.1


def test_gradient_matching_base_stats_from_a_recipe(tmp_path):
    """The recipe's `base_stats:` reaches the method: the hand-worked case above, through files and the engine."""
    import yaml
    from safetensors.torch import load_file, save_file

    import mergelab
    from mergelab.stats.io import save_stats

    def model(name, value):
        folder = tmp_path / name
        folder.mkdir()
        save_file({"w": torch.tensor([value])}, str(folder / "model.safetensors"))
        return str(folder)

    base, a, b = model("base", 0.0), model("a", 2.0), model("b", 4.0)
    sa = save_stats(tmp_path / "a.safetensors", {"w": torch.tensor([1.0])}, kind="fisher")
    sb = save_stats(tmp_path / "b.safetensors", {"w": torch.tensor([3.0])}, kind="fisher")
    s0 = save_stats(tmp_path / "base.safetensors", {"w": torch.tensor([1.0])}, kind="fisher")
    recipe = {"merge_method": "gradient_matching", "base_model": base, "base_stats": str(s0),
              "parameters": {"h0": 1.0},
              "models": [{"model": a, "stats": str(sa), "parameters": {"weight": 1.0}},
                         {"model": b, "stats": str(sb), "parameters": {"weight": 0.5}}]}
    mergelab.merge(recipe, tmp_path / "out")
    assert_close(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], torch.tensor([16 / 4.5]))
    without = {k: v for k, v in recipe.items() if k != "base_stats"}  # H_0 = h0 = 1: theta = (1*2*2 + .5*4*4)/3.5
    mergelab.merge(without, tmp_path / "out2")
    assert_close(load_file(str(tmp_path / "out2" / "model.safetensors"))["w"], torch.tensor([12 / 3.5]))
    with pytest.raises(mergelab.RecipeError, match="base_stats: ties uses no statistics of the base model"):
        mergelab.merge({"merge_method": "ties", "base_model": base, "base_stats": str(s0),
                        "models": [{"model": a, "parameters": {"weight": 1.0}}]}, tmp_path / "out3")
