"""mergelab's data-aware merges (fisher, regmean) and their statistics against fusion-bench 0.2.33.

FusionBench's FisherMergingAlgorithm / RegMeanAlgorithm leave the statistics to CLIP- and GPT-2-specific
subclasses; the generic code is the MergeLM-derived functions `fisher_merging` and `regmean_merging`,
which take models and Trainer-like objects (fusionbench/pool.py: fb_trainer). They run here on two
TinyMLPs trained on disjoint digit classes (pool.digits_tasks). Their statistics are captured by wrapping
FusionBench's own merging function (the wrapper passes everything through), so each test compares
(1) FusionBench's statistics with mergelab.stats on the same data and (2) FusionBench's merged tensors with
mergelab's method given FusionBench's statistics.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

import mergelab
from fusionbench.pool import WithLogits, assert_same, digits_tasks, fb_trainer, max_abs_diff
from mergelab.stats import diagonal_fisher, gram_matrices

fb_fisher = pytest.importorskip("fusion_bench.method.fisher_merging.fisher_merging",
                                reason="fusion-bench 0.2.33 is the reference")
fb_regmean = pytest.importorskip("fusion_bench.method.regmean.regmean")


@pytest.fixture(scope="module")
def tasks():
    base, fts, data = digits_tasks(2, seed=0, steps=30, examples=48)
    return base, fts, [x for x, _ in data]


def _captured(monkeypatch, module, name: str) -> dict:
    """Wrap module.name so that its keyword arguments are recorded; returns the record."""
    seen: dict = {}
    original = getattr(module, name)

    def wrapper(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return seen


def _quiet(fn, *args, **kwargs):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- RegMean


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_regmean_grams_and_merge_equal_fusionbench(tasks, monkeypatch, alpha):
    """Same definitions: the Gram matrix is the mean X^T X over rows (FusionBench keeps a running mean
    per batch, mergelab sums and divides once), FusionBench's reduce_non_diagonal_ratio is mergelab's
    alpha (both scale the off-diagonal entries only), every other tensor is the plain average. FusionBench
    inverts the float32 sum with torch.inverse, mergelab solves by Cholesky in float64."""
    base, fts, xs = tasks
    seen = _captured(monkeypatch, fb_regmean, "merging_with_regmean_weights")
    fb = _quiet(fb_regmean.regmean_merging, [copy.deepcopy(f) for f in fts], [fb_trainer(x, 16) for x in xs],
                [], [len(x) for x in xs], reduce_non_diagonal_ratio=alpha)
    fb_grams = [{f"{k}.weight": g for k, g in d.items()} for d in seen["models_to_merge_regmean_weights_list"]]
    ours = [gram_matrices(f, [(x[k:k + 16],) for k in range(0, len(x), 16)]) for f, x in zip(fts, xs)]
    for i, (g_fb, g_ml) in enumerate(zip(fb_grams, ours)):
        assert_same(dict(g_ml), g_fb, atol=1e-6, rtol=1e-6, what=f"Gram matrices of model {i}")
    merged = mergelab.merge_state_dicts("regmean", fts, stats=fb_grams, alpha=alpha)
    assert_same(merged, {k: v.detach() for k, v in fb.items()}, atol=1e-5, rtol=1e-4, what="regmean")
    # FusionBench on float64 copies (its inverse then exact to float64): mergelab is within 3e-6 of it,
    # FusionBench's own float32 run ~1e-5 away at alpha = 1.
    fb64 = _quiet(fb_regmean.regmean_merging, [copy.deepcopy(f).double() for f in fts],
                  [fb_trainer(x.double(), 16) for x in xs], [], [len(x) for x in xs],
                  reduce_non_diagonal_ratio=alpha)
    assert_same(merged, {k: v.detach().float() for k, v in fb64.items()}, atol=3e-6, what="regmean vs float64")


def test_regmean_singular_gram_fusionbench_fails_mergelab_ridges_towards_the_average(tasks):
    """An input feature that is always zero makes the summed Gram singular: FusionBench's torch.inverse
    raises; mergelab adds a small ridge pulling that direction towards the weighted average (warning)."""
    base, fts, xs = tasks
    grams = [gram_matrices(f, [(x * (torch.arange(x.shape[1]) != 3),)]) for f, x in zip(fts, xs)]
    fb_grams = [{k[:-len(".weight")]: g for k, g in d.items()} for d in grams]
    params = {k: [f.state_dict()[k] for f in fts] for k in base.state_dict()}
    with pytest.raises(RuntimeError, match="singular"):
        _quiet(fb_regmean.merging_with_regmean_weights, models_to_merge_param_dict=params,
               models_to_merge_regmean_weights_list=fb_grams, reduce_non_diagonal_ratio=1.0)
    with pytest.warns(UserWarning, match="singular"):
        merged = mergelab.merge_state_dicts("regmean", fts, stats=grams, alpha=1.0)
    average = (fts[0].layers[0].weight + fts[1].layers[0].weight).detach() / 2
    torch.testing.assert_close(merged["layers.0.weight"][:, 3], average[:, 3], atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------- Fisher


def _fisher_by_hand(model, x, batch_size: int, fusionbench: bool) -> dict[str, torch.Tensor]:
    """Per-class score vectors J_c = d log p(c|x) of every example, then
    FusionBench: sum over batches of (sum_{x in batch} sum_c sqrt(p_c) J_c)^2 / examples;
    mergelab ("exact"): mean over examples of sum_c p_c J_c^2 (the Fisher's diagonal)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logp(p, xi):
        return torch.log_softmax(functional_call(model, p, (xi[None],))[0], -1)

    jac = vmap(jacrev(logp), in_dims=(None, 0))(params, x)  # name -> (b, C, *shape)
    prob = torch.softmax(model(x), -1).detach()  # (b, C)
    out = {}
    for k, j in jac.items():
        w = prob.view(*prob.shape, *[1] * (j.dim() - 2))
        if fusionbench:
            per_batch = [(w[s:s + batch_size].sqrt() * j[s:s + batch_size]).sum((0, 1)) ** 2
                         for s in range(0, len(x), batch_size)]
            out[k] = sum(per_batch) / len(x)
        else:
            out[k] = (w * j ** 2).sum(1).mean(0)
    return out


def _fb_fisher_merge(fts, xs, monkeypatch, batch_size=1, normalize=False, minimal=1e-6):
    seen = _captured(monkeypatch, fb_fisher, "merging_with_fisher_weights")
    fb = _quiet(fb_fisher.fisher_merging, [WithLogits(copy.deepcopy(f)) for f in fts],
                [fb_trainer(x, batch_size) for x in xs], [], [len(x) for x in xs],
                normalize_fisher_weight=normalize, minimal_fisher_weight=minimal)
    strip = len("net.")
    fishers = [{k[strip:]: v for k, v in d.items()} for d in seen["models_to_merge_fisher_weights_list"]]
    return {k[strip:]: v.detach() for k, v in fb.items()}, fishers


@pytest.mark.parametrize("batch_size", [1, 4])
def test_fisher_statistics_fusionbench_squares_a_summed_score_mergelab_the_exact_diagonal(
        tasks, monkeypatch, batch_size):
    """FusionBench (after MergeLM) squares the gradient of sum_{x in batch} sum_c sqrt(p_c) log p_c, which
    is not the Fisher diagonal sum_c p_c (d log p_c)^2 that mergelab's kind="exact" takes per example: the
    cross terms between classes (and, for batches > 1, between examples) stay in. Both pinned by hand."""
    base, fts, xs = tasks
    xs = [x[:16] for x in xs]
    _, fishers = _fb_fisher_merge(fts, xs, monkeypatch, batch_size=batch_size)
    for i, (f, x) in enumerate(zip(fts, xs)):
        assert_same(fishers[i], _fisher_by_hand(f, x, batch_size, True), atol=1e-6, rtol=1e-5,
                    what=f"FusionBench's Fisher of model {i} by hand")
        ours = diagonal_fisher(f, [(x,)], kind="exact")
        assert_same(dict(ours), _fisher_by_hand(f, x, batch_size, False), atol=1e-6, rtol=1e-5,
                    what=f"mergelab's Fisher of model {i} by hand")
        assert max(max_abs_diff(dict(ours), fishers[i]).values()) > 1e-2


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_merge_equals_fusionbench_with_its_floor_added_and_global_norm_as_weights(
        tasks, monkeypatch, normalize):
    """FusionBench adds minimal_fisher_weight m to every Fisher entry (mergelab raises entries below
    fisher_floor to it), and normalize_fisher_weight divides each model's weight by the L2 norm of its
    Fisher over the WHOLE model (mergelab's normalize_fisher divides per tensor). Exact relation:
    FusionBench(m, normalize) = mergelab fisher with stats F_i + m and weight_i = 1/N, times
    (1 / (||F_i||_all + m)) / sum_j (1 / (||F_j||_all + m)) when normalizing."""
    base, fts, xs = tasks
    m = 1e-6
    fb, fishers = _fb_fisher_merge(fts, xs, monkeypatch, normalize=normalize, minimal=m)
    n = len(fts)
    weights = [1.0 / n] * n
    if normalize:
        norms = [float(torch.cat([v.flatten() for v in f.values()]).norm()) for f in fishers]
        inv = [1 / (v + m) for v in norms]
        weights = [w * i / sum(inv) for w, i in zip(weights, inv)]
    stats = [{k: v + m for k, v in f.items()} for f in fishers]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # F + m is never below the floor m: nothing may be raised
        merged = mergelab.merge_state_dicts("fisher", fts, stats=stats, weight=weights, fisher_floor=m)
    assert_same(merged, fb, atol=1e-6, rtol=1e-5, what="fisher")
    if normalize:  # mergelab's own per-tensor normalisation is another weighting
        per_tensor = mergelab.merge_state_dicts("fisher", fts, stats=stats, normalize_fisher=True)
        assert max(max_abs_diff(per_tensor, fb).values()) > 1e-4
