"""Interpolation paths, barriers, scaling curves and planes on models with closed-form losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mergelab.analysis.evaluators import classifier_evaluator
from mergelab.analysis.paths import (
    barrier,
    interpolation_path,
    plane,
    scaling_curve,
    slerp_tensor,
)
from mergelab.cli.tables import render_path, render_plane, render_scaling
from mergelab.errors import MergeError, ShapeMismatch

FAST = settings(max_examples=25, deadline=None)


class Vector(nn.Module):
    """A "model" that is just a parameter vector, for losses written in closed form."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim, dtype=torch.float64))


def t0(model: Vector) -> float:
    return float(model.theta.detach()[0])


def sd(*values) -> dict[str, torch.Tensor]:
    return {"theta": torch.tensor(values, dtype=torch.float64)}


def double_well(model):
    t = t0(model)
    return {"loss": (t * t - 1) ** 2, "accuracy": -((t * t - 1) ** 2)}


def test_identical_models_have_zero_barrier():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    result = interpolation_path(net, net.state_dict(), {k: v.clone() for k, v in net.state_dict().items()},
                                classifier_evaluator(X, y), points=5)
    assert result.barrier == 0.0 and result.accuracy_barrier == 0.0
    assert result.merge_gain == {"loss": 0.0, "accuracy": 0.0}
    assert len(set(result.metrics["loss"])) == 1


def test_convex_quadratic_has_zero_barrier_and_the_expected_curve():
    result = interpolation_path(Vector(), sd(-1.0), sd(3.0), lambda m: {"loss": (t0(m) - 0.5) ** 2})
    expected = [((1 - a) * -1.0 + a * 3.0 - 0.5) ** 2 for a in result.alphas]
    np.testing.assert_allclose(result.metrics["loss"], expected, rtol=1e-12)
    assert result.barrier == 0.0  # interior points lie strictly below the chord; the endpoints give 0
    assert result.merge_gain["loss"] == pytest.approx(0.5 ** 2 - (1.5 ** 2 + 2.5 ** 2) / 2)


@pytest.mark.parametrize("b", [1.0, 1.2, 0.8])
def test_double_well_barrier_matches_closed_form(b):
    # L(t) = (t^2 - 1)^2 from -b to b: the gap to the (flat) chord peaks at t = 0 (alpha = 0.5)
    # when b^2 <= 2, so barrier = L(0) - L(b) = 1 - (b^2 - 1)^2.
    result = interpolation_path(Vector(), sd(-b), sd(b), double_well, points=11)
    closed = 1 - (b * b - 1) ** 2
    assert result.barrier == pytest.approx(closed, rel=1e-12)
    assert result.accuracy_barrier == pytest.approx(closed, rel=1e-12)  # accuracy = -loss: same barrier
    assert result.merge_gain["loss"] == pytest.approx(closed)


@FAST
@given(curv=st.floats(0, 5), slope=st.floats(-3, 3), tilt=st.floats(-3, 3), points=st.integers(2, 12))
def test_barrier_ignores_linear_terms_and_is_zero_for_convex_curves(curv, slope, tilt, points):
    alphas = np.linspace(0, 1, points).tolist()
    convex = [curv * (a - 0.3) ** 2 + slope * a for a in alphas]
    assert barrier(alphas, convex) == pytest.approx(0.0, abs=1e-12)
    bump = [-curv * a * (1 - a) for a in alphas]  # concave along the path: a barrier of curv * max a(1-a)
    tilted = [v + tilt * a for v, a in zip(bump, alphas)]
    assert barrier(alphas, tilted, higher_is_better=True) == pytest.approx(
        barrier(alphas, [-v for v in bump]), abs=1e-9)


def test_slerp_matches_mergekit():
    mk = pytest.importorskip("mergekit.merge_methods.slerp")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (0.0, 0.3, 0.5, 1.0):
        want = mk.slerp(torch.tensor([t]), a[None], b[None])[0]
        torch.testing.assert_close(slerp_tensor(a, b, t), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slerp_tensor(a, 2 * a, 0.4), 1.4 * a)  # parallel: linear fallback


def test_slerp_path_keeps_norm_of_equal_norm_endpoints():
    a = sd(3.0, 0.0)
    b = sd(0.0, 3.0)
    norms = []
    result = interpolation_path(Vector(2), a, b, lambda m: norms.append(float(m.theta.detach().norm())) or {"loss": 0.0},
                                points=5, method="slerp")
    assert result.method == "slerp"
    np.testing.assert_allclose(norms, 3.0, rtol=1e-12)


def test_scaling_curve_finds_the_best_lambda():
    c = 1.5
    result = scaling_curve(Vector(), sd(0.0), [sd(1.0), sd(2.0)], lambda m: {"loss": (t0(m) - c) ** 2},
                           lambdas=[0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(result.metrics["loss"], [(3 * lam - c) ** 2 for lam in result.lambdas])
    assert result.best_lambda == 0.5 and result.best_value == 0.0


def test_plane_recovers_a_known_quadratic():
    rng = np.random.default_rng(0)
    dim = 5
    q = rng.normal(size=(dim, dim))
    h = q @ q.T + np.eye(dim)  # symmetric positive definite
    c = rng.normal(size=dim)
    o, a, b = (rng.normal(size=dim) for _ in range(3))

    def quad(model):
        d = model.theta.detach().numpy() - c
        return {"loss": float(d @ h @ d)}

    result = plane(Vector(dim), sd(*o), sd(*a), sd(*b), quad, grid=7, margin=0.2, extra={"mid": sd(*(a + b) / 2)})
    basis, r = np.linalg.qr(np.stack([a - o, b - o], axis=1))
    basis = basis * np.sign(np.diag(r))  # orient e1 towards A and e2 towards B's side
    assert result.points["A"] == pytest.approx([np.linalg.norm(a - o), 0.0], abs=1e-9)
    assert result.points["B"] == pytest.approx(list(basis.T @ (b - o)), abs=1e-9)
    assert result.points["mid"] == pytest.approx(list(basis.T @ ((a + b) / 2 - o)), abs=1e-9)
    assert result.off_plane["mid"] == pytest.approx(0.0, abs=1e-9)
    grid = np.array(result.metrics["loss"])
    xs, ys = np.meshgrid(result.x, result.y)  # [iy][ix], like the result
    points = o[None, None] + xs[..., None] * basis[:, 0] + ys[..., None] * basis[:, 1]
    want = np.einsum("yxi,ij,yxj->yx", points - c, h, points - c)
    np.testing.assert_allclose(grid, want, rtol=1e-9)
    # The grid is a quadratic in (x, y) whose curvature is the Hessian restricted to the plane.
    design = np.stack([xs**2, xs * ys, ys**2, xs, ys, np.ones_like(xs)], axis=-1).reshape(-1, 6)
    coef = np.linalg.lstsq(design, grid.reshape(-1), rcond=None)[0]
    restricted = basis.T @ h @ basis
    np.testing.assert_allclose(coef[:3], [restricted[0, 0], 2 * restricted[0, 1], restricted[1, 1]], rtol=1e-8)
    assert result.point_metrics["A"]["loss"] == pytest.approx((a - c) @ h @ (a - c))
    assert render_plane(result).row_count == 4


def test_plane_reports_distance_of_extra_models_and_rejects_collinear_ones():
    off = plane(Vector(3), sd(0, 0, 0), sd(1, 0, 0), sd(0, 1, 0), lambda m: {"loss": 0.0}, grid=3,
                extra={"up": sd(0.2, 0.3, 0.5)})
    assert off.points["up"] == pytest.approx([0.2, 0.3]) and off.off_plane["up"] == pytest.approx(0.5)
    with pytest.raises(MergeError, match="lie on one line"):
        plane(Vector(3), sd(0, 0, 0), sd(1, 0, 0), sd(2, 0, 0), lambda m: {"loss": 0.0}, grid=3)


def test_different_shapes_are_a_clear_error():
    with pytest.raises(ShapeMismatch, match=r"model B tensor theta has shape \(2,\), model A has \(1,\)"):
        interpolation_path(Vector(), sd(0.0), sd(0.0, 1.0), double_well)


def test_evaluator_that_raises_names_evaluator_and_alpha():
    def flaky(model):
        if t0(model) > 0.65:
            raise RuntimeError("out of memory")
        return {"loss": 0.0}

    with pytest.raises(MergeError, match=r"evaluator .*flaky failed at alpha=0.7 \(linear path\): RuntimeError"):
        interpolation_path(Vector(), sd(0.0), sd(1.0), flaky)


def test_evaluator_returning_nan_names_metric_and_alpha():
    def diverging(model):
        return {"loss": float("nan") if t0(model) > 0.35 else 1.0}

    with pytest.raises(MergeError, match=r"diverging returned loss=nan at alpha=0.4"):
        interpolation_path(Vector(), sd(0.0), sd(1.0), diverging)
    with pytest.raises(MergeError, match="lambda=2"):
        scaling_curve(Vector(), sd(0.0), [sd(1.0)], lambda m: {"loss": 1 / (2 - t0(m))}, [1, 2])


def test_template_gets_its_weights_back_and_factories_work():
    model = Vector()
    model.theta.data.fill_(7.0)
    interpolation_path(model, sd(0.0), sd(1.0), double_well, points=3)
    assert t0(model) == 7.0
    result = interpolation_path(Vector, sd(-1.0), sd(1.0), double_well, points=3)
    assert result.barrier == pytest.approx(1.0)


def test_batchnorm_statistics_are_refreshed_at_each_point():
    torch.manual_seed(0)
    X = torch.randn(64, 3)
    net_a, net_b = (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2))
    seen = {}

    def record(model):
        seen[round(float(model[0].weight.detach()[0, 0]), 6)] = model[1].running_mean.clone()
        return {"loss": 0.0}

    interpolation_path(net_a, net_a.state_dict(), net_b.state_dict(), record, points=3, refresh_bn=[X[:32], X[32:]])
    w = torch.lerp(net_a[0].weight, net_b[0].weight, 0.5).detach()
    bias = torch.lerp(net_a[0].bias, net_b[0].bias, 0.5).detach()
    torch.testing.assert_close(seen[round(float(w[0, 0]), 6)], (X @ w.T + bias).mean(0))
    with pytest.raises(MergeError, match=r"batch-norm refresh failed at alpha=0 \(linear path\): RuntimeError"):
        interpolation_path(net_a, net_a.state_dict(), net_b.state_dict(), record, points=2,
                           refresh_bn=[torch.randn(4, 7)])  # 7 features, the model takes 3
    with pytest.raises(MergeError, match="one-shot iterator"):
        interpolation_path(net_a, net_a.state_dict(), net_b.state_dict(), record, points=2, refresh_bn=iter([X]))


def test_renderers_list_every_point():
    path = interpolation_path(Vector(), sd(-1.0), sd(1.0), double_well, points=5)
    assert render_path(path).row_count == 5 + 2
    curve = scaling_curve(Vector(), sd(0.0), [sd(1.0)], double_well, [0.0, 0.5, 1.0])
    assert render_scaling(curve).row_count == 3 and curve.best_lambda == 1.0
