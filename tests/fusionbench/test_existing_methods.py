"""mergelab's data-free methods against fusion-bench 0.2.33 on tiny models the tests build.

Reference: FusionBench's own algorithm classes (TaskArithmeticAlgorithm, TiesMergingAlgorithm,
DareTaskArithmetic / DareSimpleAverage / DareTiesMerging, TaskSingularVectorMerging, the isotropic
merges, ModelStock) run on a BaseModelPool of deep copies of the same nn.Modules (fusionbench/pool.py).
Where both compute the same operations the tensors are compared bit for bit; where one side works in
float64 (mergelab's spectral merges) within float32 rounding; where the definitions differ the test pins
the exact relation and the method's docstring says so. docs/_parts/fbparity.md tabulates the results.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mergelab
from fusionbench.pool import (
    assert_same,
    exact_low_rank_models,
    fb_pool,
    fb_run,
    max_abs_diff,
    square_models,
    tiny_models,
)

fb_method = pytest.importorskip("fusion_bench.method", reason="fusion-bench 0.2.33 is the reference")
from fusion_bench.method.isotropic_merging import (  # noqa: E402
    IsotropicMergingInCommonAndTaskSubspace,
    IsotropicMergingInCommonSubspace,
)


@pytest.fixture(scope="module")
def mlp():
    return tiny_models(3, seed=0)


@pytest.fixture(scope="module")
def square():
    return square_models(3, seed=1)


def ml(method, models, **params):
    base, fts = models
    return mergelab.merge_state_dicts(method, fts, base=base, **params)


# ----------------------------------------------------------------------------- task arithmetic, TIES


def test_task_arithmetic_is_fusionbench_bit_for_bit(mlp):
    fb = fb_run(fb_method.TaskArithmeticAlgorithm(scaling_factor=0.3), fb_pool(*mlp))
    assert_same(ml("task_arithmetic", mlp, weight=1.0, **{"lambda": 0.3}), fb, what="task_arithmetic")


def _global_trim_densities(base, fts, threshold):
    """Per tensor and model, the share of entries FusionBench's TIES keeps: its trim is global over the
    whole flattened model (sorted keys), keeping |tau| >= the (d - int(d K))-th smallest |tau|."""
    names = sorted(base.state_dict())
    out = []
    for ft in fts:
        tv = {k: ft.state_dict()[k] - base.state_dict()[k] for k in names}
        flat = torch.cat([tv[k].reshape(-1) for k in names]).abs()
        d = flat.numel()
        kth = flat.kthvalue(d - int(d * threshold)).values
        out.append({k: int((tv[k].abs() >= kth).sum()) for k in names})
    return out


@pytest.mark.parametrize("merge_func, normalize", [("sum", False), ("mean", True)])
def test_ties_equals_fusionbench_with_its_global_trim_as_per_tensor_densities(mlp, merge_func, normalize):
    """FusionBench trims each task vector once over the whole model; mergelab (MergeKit's TIES) per tensor.

    Exact relation: FusionBench's TIES with threshold K = mergelab's ties run tensor by tensor with model
    i's density on tensor t = the share of t's entries at or above model i's global K-threshold (entries
    kept: that count, FusionBench's int(d K) + 1 over the model). merge_func "sum" is normalize=False,
    "mean" (disjoint mean) normalize=True with weights 1; scaling_factor is lambda.
    """
    base, fts = mlp
    fb = fb_run(fb_method.TiesMergingAlgorithm(scaling_factor=0.7, threshold=0.2, remove_keys=[],
                                               merge_func=merge_func), fb_pool(base, fts))
    counts = _global_trim_densities(base, fts, 0.2)
    total = sum(counts[0].values())
    assert total == int(0.2 * sum(t.numel() for t in base.state_dict().values())) + 1
    ours = {}
    for name, b in base.state_dict().items():
        kept = [c[name] for c in counts]
        if min(kept) == 0:  # mergelab's density must be > 0; FusionBench kept nothing of this tensor there
            continue
        dens = [min(1.0, (k + 0.5) / b.numel()) for k in kept]  # floor(density * numel) = k exactly
        ours[name] = mergelab.merge_tensors("ties", [ft.state_dict()[name] for ft in fts], base=b,
                                            weight=1.0, density=dens, normalize=normalize, **{"lambda": 0.7})
    assert len(ours) >= len(fb) - 1
    assert_same(ours, {k: fb[k] for k in ours}, atol=1e-7, what=f"ties/{merge_func}")
    # The difference itself: the same density on every tensor (mergelab's recipe form) is not FusionBench's.
    uniform = ml("ties", mlp, weight=1.0, density=0.2, normalize=normalize, **{"lambda": 0.7})
    assert max(float((uniform[k] - fb[k]).abs().max()) for k in fb) > 1e-3


# ----------------------------------------------------------------------------- DARE


def test_dare_at_density_one_is_fusionbench_task_arithmetic_average_and_ties(mlp):
    """sparsity_ratio 0 keeps everything on both sides (FusionBench: rand > 0, rescale / 1; mergelab:
    density 1 draws no mask), so DARE reduces to task arithmetic / TIES exactly."""
    base, fts = mlp
    fb = fb_run(fb_method.DareTaskArithmetic(scaling_factor=0.4, sparsity_ratio=0.0,
                                             only_on_linear_weights=False), fb_pool(base, fts))
    assert_same(ml("dare_linear", mlp, weight=1.0, density=1.0, seed=3, **{"lambda": 0.4}), fb, atol=1e-7)
    fb = fb_run(fb_method.DareSimpleAverage(sparsity_ratio=0.0, only_on_linear_weights=False), fb_pool(base, fts))
    assert_same(ml("dare_linear", mlp, weight=1.0, density=1.0, normalize=True, seed=3), fb, atol=1e-7)
    # threshold 99.99 (read as 0.9999 of d < 10^4 entries) keeps every entry in FusionBench's TIES trim
    for merge_func, normalize in (("sum", False), ("mean", True)):
        fb = fb_run(fb_method.DareTiesMerging(sparsity_ratio=0.0, only_on_linear_weights=False, rescale=True,
                                              scaling_factor=0.6, threshold=99.99, remove_keys=[],
                                              merge_func=merge_func), fb_pool(base, fts))
        ours = ml("dare_ties", mlp, weight=1.0, density=1.0, normalize=normalize, seed=3, **{"lambda": 0.6})
        assert_same(ours, fb, atol=1e-7, what=f"dare_ties/{merge_func}")


def test_dare_masks_fusionbench_by_hand_and_mergelab_by_statistics(mlp):
    """The random masks cannot match: FusionBench draws torch.rand_like from torch's global generator,
    mergelab a counter-based hash of (seed, model, entry). What is pinned instead:

    FusionBench: with torch seeded, its output is base + s sum_i m_i tau_i / (1 - p) with m_i =
    rand_like(tau_t) > p drawn model by model, parameter by parameter (the paper's 1/(1-p) rescale).
    mergelab: kept share ~ density, and the kept entries are tau scaled by ||tau||_1 / ||m tau||_1 (its
    L1 rescale, MergeKit's), whose expectation is about 1/density as FusionBench's constant.
    """
    base, fts = mlp
    p, s = 0.7, 0.5
    torch.manual_seed(11)
    fb = fb_run(fb_method.DareTaskArithmetic(scaling_factor=s, sparsity_ratio=p, only_on_linear_weights=False),
                fb_pool(base, fts))
    torch.manual_seed(11)
    taus = [{k: ft.state_dict()[k] - v for k, v in base.state_dict().items()} for ft in fts]
    masked = [{k: tau[k] * (torch.rand_like(tau[k]) > p) / (1 - p) for k in tau} for tau in taus]
    hand = {k: v + s * sum(m[k] for m in masked) for k, v in base.state_dict().items()}
    assert_same(hand, fb, atol=1e-7, what="FusionBench DARE by hand")

    big = torch.nn.Linear(200, 200)
    ft = torch.nn.Linear(200, 200)
    torch.nn.init.normal_(ft.weight)
    density = 1 - p
    out = mergelab.merge_state_dicts("dare_linear", [ft], base=big, weight=1.0, density=density, seed=5)
    tau = ft.weight.detach() - big.weight.detach()
    kept_delta = out["weight"] - big.weight.detach()
    mask = kept_delta != 0
    share = float(mask.float().mean())
    assert abs(share - density) < 4 * math.sqrt(density * (1 - density) / tau.numel())
    scale = float(tau.abs().sum() / tau[mask].abs().sum())
    torch.testing.assert_close(kept_delta[mask], tau[mask] * scale, rtol=1e-5, atol=1e-6)
    assert abs(scale * density - 1) < 0.03  # FusionBench's rescale is exactly 1 / density
    again = mergelab.merge_state_dicts("dare_linear", [ft], base=big, weight=1.0, density=density, seed=5)
    assert_same(out, again)


# ----------------------------------------------------------------------------- spectral: TSV, Iso-C, Iso-CTS


def _as64(models):
    """Float64 deep copies (nn.Module.double() converts in place)."""
    base, fts = models
    return copy.deepcopy(base).double(), [copy.deepcopy(f).double() for f in fts]


SPECTRAL = [
    ("tsv", lambda: fb_method.TaskSingularVectorMerging(alpha=0.8), {"alpha": 0.8}),
    ("iso_c", lambda: IsotropicMergingInCommonSubspace(scaling_factor=0.8), {"alpha": 0.8}),
    ("iso_cts", lambda: IsotropicMergingInCommonAndTaskSubspace(scaling_factor=0.8, common_space_fraction=0.5),
     {"alpha": 0.8, "common_space_fraction": 0.5}),
]


@pytest.mark.parametrize("method, algorithm, params", SPECTRAL, ids=[m for m, _, _ in SPECTRAL])
@pytest.mark.parametrize("shape", ["mlp", "square", "odd"])
def test_spectral_merges_equal_fusionbench(method, algorithm, params, shape, mlp, square):
    """Same definitions (1-D tensors: base + alpha * mean task vector). mergelab takes its SVDs in float64,
    FusionBench in float32: against FusionBench on float64 copies of the models they agree to 1e-6 of the
    weights (float32 output rounding); against FusionBench in float32 to its own float32 SVD error, which on
    the low-rank square tasks (tiny trailing singular values) reaches ~1e-5. "odd": r = 10 is not a multiple
    of N = 3 (TSV keeps 3 directions per task, FusionBench's block matrices carry a zero column)."""
    models = {"mlp": mlp, "square": square}.get(shape) or square_models(3, seed=5, dim=10)
    ours = ml(method, models, **params)
    fb64 = fb_run(algorithm(), fb_pool(*_as64(models)))
    assert_same(ours, {k: v.float() for k, v in fb64.items()}, atol=1e-6, what=f"{method} vs float64")
    fb32 = fb_run(algorithm(), fb_pool(*models))
    assert_same(ours, fb32, atol=2e-5, what=f"{method} vs float32")


@pytest.mark.parametrize("method, algorithm, params", [SPECTRAL[0], SPECTRAL[2]], ids=["tsv", "iso_cts"])
def test_exactly_low_rank_tasks_fusionbench_depends_on_the_lapack_null_basis(method, algorithm, params):
    """Task matrices of rank 2 (exactly) with 4 directions kept per task: FusionBench puts the singular
    vectors of the zero singular values (an arbitrary basis LAPACK returns) into its Procrustes step, which
    moves every kept direction, so its float32 and float64 runs on the same models differ by a large part
    of the update. mergelab leaves directions below the numerical-rank tolerance out: its float32 and
    float64 results agree to float32 rounding, and equal FusionBench's where tasks have full rank (above)."""
    models = exact_low_rank_models(3, seed=0, dim=12, rank=2)
    ours32, ours64 = ml(method, models, **params), ml(method, _as64(models), **params)
    assert_same(ours32, {k: v.float() for k, v in ours64.items()}, atol=1e-7, what=f"{method} float32 vs 64")
    fb32, fb64 = fb_run(algorithm(), fb_pool(*models)), fb_run(algorithm(), fb_pool(*_as64(models)))
    update = float((ours32["proj.weight"] - models[0].proj.weight.detach()).abs().max())
    assert max_abs_diff(fb32, fb64)["proj.weight"] > 0.2 * update


def test_iso_cts_caps_the_task_subspace_where_fusionbench_overshoots():
    """Iso-CTS splits r = min(m, n) into k_c common + N k_t task directions, k_t = round((r - floor(f r)) / N).
    With r = 11, N = 2, f = 0 the round gives k_t = 6, 2 * 6 > 11: FusionBench's common size becomes -1
    and its slices fail; mergelab caps k_t at r // N = 5 (k_c = 1), which is FusionBench's split for
    f = 0.1, so mergelab(f = 0) = FusionBench(f = 0.1)."""
    base, fts = square_models(2, seed=2, dim=11, rank=4)
    ours = mergelab.merge_state_dicts("iso_cts", fts, base=base, alpha=1.0, common_space_fraction=0.0)
    with pytest.raises(RuntimeError):
        fb_run(IsotropicMergingInCommonAndTaskSubspace(scaling_factor=1.0, common_space_fraction=0.0),
               fb_pool(base, fts))
    fb = fb_run(IsotropicMergingInCommonAndTaskSubspace(scaling_factor=1.0, common_space_fraction=0.1),
                fb_pool(*_as64((base, fts))))
    assert_same(ours, {k: v.float() for k, v in fb.items()}, atol=1e-6)


def test_iso_c_on_a_rank_deficient_sum_averages_only_its_nonzero_singular_values():
    """Two rank-2 task matrices of a 12 x 12 weight sum to rank q = 4. FusionBench flattens all r = 12
    singular values: sigma_bar = sum(S) / 12 on every direction, the 8 null directions of the sum (an
    arbitrary basis from LAPACK) included. mergelab keeps the q directions above the numerical-rank
    tolerance: sigma_bar = sum(S) / q. Exact relation: mergelab's task matrix = (r / q) P_U D_fb P_V, with
    D_fb FusionBench's and P_U, P_V the projections onto the sum's q leading singular vectors."""
    base, fts = square_models(2, seed=4, dim=12, rank=2, noise=0.0)
    total = sum((f.proj.weight - base.proj.weight).detach().double() for f in fts)
    u, s, vh = torch.linalg.svd(total)
    q = 4
    assert float(s[q - 1]) > 1e-3 > 1e-6 > float(s[q])
    ours = mergelab.merge_state_dicts("iso_c", fts, base=base, alpha=1.0)["proj.weight"]
    fb = fb_run(IsotropicMergingInCommonSubspace(scaling_factor=1.0), fb_pool(*_as64((base, fts))))
    d_fb = fb["proj.weight"] - base.proj.weight.detach().double()
    pu, pv = u[:, :q] @ u[:, :q].T, vh[:q].T @ vh[:q]
    d_ours = (ours - base.proj.weight.detach()).double()
    torch.testing.assert_close(d_ours, (12 / q) * (pu @ d_fb @ pv), atol=1e-7, rtol=0)
    assert float((d_fb - pu @ d_fb @ pv).abs().max()) > 1e-2  # FusionBench's null-space part


# ----------------------------------------------------------------------------- Model Stock


def _stock_by_hand(base, fts, average_angles: bool, floor: float = 0.0, add: float = 0.0):
    """t * mean_i theta_i + (1 - t) * base per tensor with t = N c / (1 + (N - 1) c); c = cos of the mean
    pairwise angle (FusionBench) or the mean pairwise cosine (mergelab, MergeKit), each cosine
    <a, b> / max(|a| |b| + add, floor)."""
    out = {}
    n = len(fts)
    for k, b in base.state_dict().items():
        taus = [(ft.state_dict()[k] - b).double().flatten() for ft in fts]
        cos = [float(taus[i] @ taus[j] / max(float(taus[i].norm() * taus[j].norm()) + add, floor))
               for i in range(n) for j in range(i + 1, n)]
        c = math.cos(sum(math.acos(x) for x in cos) / len(cos)) if average_angles else sum(cos) / len(cos)
        t = n * c / (1 + (n - 1) * c)
        mean = sum(ft.state_dict()[k].double() for ft in fts) / n
        out[k] = (t * mean + (1 - t) * b.double()).float()
    return out


def test_model_stock_two_models_equals_fusionbench(mlp):
    base, fts = mlp
    fb = fb_run(fb_method.ModelStock(), fb_pool(base, fts[:2]))
    assert_same(ml("model_stock", (base, fts[:2])), fb, atol=1e-6)


def test_model_stock_three_models_average_angles_in_fusionbench_cosines_in_mergelab(mlp):
    """For N > 2 FusionBench averages the pairwise angles and takes the cosine of the mean; mergelab (as
    MergeKit) averages the cosines. Both are pinned by hand; they differ as cos(mean angle) != mean cos."""
    base, fts = mlp
    fb = fb_run(fb_method.ModelStock(), fb_pool(base, fts))
    ours = ml("model_stock", mlp)
    assert_same(fb, _stock_by_hand(base, fts, average_angles=True), atol=1e-6, what="FusionBench by hand")
    assert_same(ours, _stock_by_hand(base, fts, average_angles=False), atol=1e-6, what="mergelab by hand")
    assert max(float((ours[k] - fb[k]).abs().max()) for k in fb) > 1e-4


def test_model_stock_small_task_vectors_mergekit_floor_on_the_norm_product():
    """mergelab (as MergeKit 0.1.5) divides <tau_1, tau_2> by max(|tau_1| |tau_2|, 1e-6), FusionBench by
    |tau_1| |tau_2| + 1e-8. Where the product of the norms is below 1e-6 (task vectors of norm < 1e-3:
    small biases and norms of a real fine-tune) mergelab's cosine shrinks, so t -> 0 and the tensor stays
    near the base; FusionBench's cosine shrinks only below ~1e-8. Both pinned by hand."""
    base, fts = tiny_models(2, seed=3, scale=1e-3)
    fb = fb_run(fb_method.ModelStock(), fb_pool(base, fts))
    ours = ml("model_stock", (base, fts))
    assert_same(fb, _stock_by_hand(base, fts, average_angles=True, add=1e-8), atol=1e-6,
                what="FusionBench by hand")
    assert_same(ours, _stock_by_hand(base, fts, average_angles=False, floor=1e-6), atol=1e-6,
                what="mergelab by hand")
    tau = [(f.layers[2].bias - base.layers[2].bias).detach() for f in fts]
    assert float(tau[0].norm() * tau[1].norm()) < 1e-7
    moved = fb["layers.2.bias"] - base.layers[2].bias.detach()
    assert float((ours["layers.2.bias"] - fb["layers.2.bias"]).abs().max()) > 0.5 * float(moved.abs().max())
