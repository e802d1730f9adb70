"""Metrics along paths between models: interpolation barriers, scaling curves, 2-D planes.

Every function takes a template `model` (an nn.Module, or a zero-argument factory
returning one) whose weights are replaced by each point's state dict before the
evaluator runs; the template's own weights are put back afterwards. State dicts
may be given as nn.Modules. Only floating-point tensors are moved along a path;
integer buffers (batch-norm counters) are taken from the first model. Batch-norm
statistics, which interpolation leaves stale, are recomputed at every point when
`refresh_bn` is given (a callable model -> None, or reusable batches).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mergelab.analysis.evaluators import (
    BatchNormRefresh,
    Evaluator,
    ModelLike,
    StateLike,
    as_state,
    evaluate_points,
    float_keys,
)
from mergelab.errors import MergeError

MAXIMIZED = ("accuracy",)  # metrics where higher is better; every other metric is a loss


# ----------------------------------------------------------------------------- interpolation


def _compute_dtype(t: Tensor) -> torch.dtype:
    # float32 for every storage dtype, but float64 inputs keep their precision.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def slerp_tensor(a: Tensor, b: Tensor, t: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two whole tensors (Shoemake, 1985), MergeKit's semantics.

    theta = arccos(<a/|a|, b/|b|>); result = sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b,
    falling back to (1-t) a + t b when |cos theta| > dot_threshold (nearly parallel or
    antiparallel, where the formula is ill-conditioned). Computed in float32 (float64 stays).
    """
    dtype = _compute_dtype(a)
    x, y = a.to(dtype), b.to(dtype)
    na, nb = x.norm(), y.norm()
    dot = float(((x / (na if na > eps else 1)) * (y / (nb if nb > eps else 1))).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return (1 - t) * x + t * y
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)


def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float, keys: Sequence[str],
                method: str = "linear") -> dict[str, Tensor]:
    """State dict at `alpha` on the path from a (alpha=0) to b (alpha=1); tensors not in keys come from a."""
    out = dict(a)
    for k in keys:
        if method == "slerp":
            out[k] = slerp_tensor(a[k], b[k], alpha).to(a[k].dtype)
        else:
            dtype = _compute_dtype(a[k])
            out[k] = torch.lerp(a[k].to(dtype), b[k].to(dtype), alpha).to(a[k].dtype)
    return out


def barrier(alphas: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False) -> float:
    """Largest gap between a metric along a path and the chord between its endpoints.

    loss:     max_a [L(a) - ((1-a) L(0) + a L(1))]
    accuracy: max_a [((1-a) A(0) + a A(1)) - A(a)]   (sign flipped: a dip is a barrier)
    The endpoints are in the max, so the barrier is >= 0 and is 0 for a convex loss.
    `alphas` must contain 0 and 1.
    """
    at = dict(zip(alphas, values))
    if 0.0 not in at or 1.0 not in at:
        raise MergeError("barrier needs the metric at alpha=0 and alpha=1")
    sign = -1.0 if higher_is_better else 1.0
    return max(sign * (v - ((1 - a) * at[0.0] + a * at[1.0])) for a, v in zip(alphas, values))


@dataclasses.dataclass
class PathResult:
    """Metrics along an interpolation path; plain data."""

    method: str
    alphas: list[float]
    metrics: dict[str, list[float]]  # metric -> value at each alpha
    barriers: dict[str, float]  # metric -> barrier (accuracy-like metrics with the sign flipped)
    merge_gain: dict[str, float]  # metric at alpha=0.5 minus the mean of the endpoints

    @property
    def barrier(self) -> float | None:
        return self.barriers.get("loss")

    @property
    def accuracy_barrier(self) -> float | None:
        return self.barriers.get("accuracy")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def interpolation_path(model: ModelLike, sd_a: StateLike, sd_b: StateLike, evaluator: Evaluator,
                       points: int = 11, method: str = "linear", refresh_bn: BatchNormRefresh = None,
                       maximize: Sequence[str] = MAXIMIZED) -> PathResult:
    """Evaluate models on the path from A to B, with barriers and merge gain.

    Args:
        model: template module (or factory) of the architecture of A and B.
        sd_a, sd_b: the endpoints (state dicts or modules).
        evaluator: model -> dict of metrics (see analysis/evaluators.py).
        points: evenly spaced alphas in [0, 1]; 0.5 is added when absent, for the merge gain.
        method: "linear" ((1-a) A + a B) or "slerp" (per tensor, see slerp_tensor).
        refresh_bn: recompute batch-norm statistics at each point (callable or batches).
        maximize: metrics where higher is better (their barrier has the sign flipped).

    Returns:
        PathResult; `barrier` is the loss barrier max_a [L(a) - ((1-a) L(A) + a L(B))],
        `merge_gain[m]` = m(0.5) - (m(A) + m(B)) / 2 for every metric m (for a loss,
        negative means the midpoint is better than the endpoints' mean).
    """
    if method not in ("linear", "slerp"):
        raise MergeError(f"interpolation_path: method must be 'linear' or 'slerp', got {method!r}")
    if points < 2:
        raise MergeError(f"interpolation_path: points must be at least 2, got {points}")
    a, b = as_state(sd_a), as_state(sd_b)
    keys = float_keys({"model A": a, "model B": b})
    alphas = sorted({round(i / (points - 1), 12) for i in range(points)} | {0.5})
    metrics = evaluate_points(model, ((f"alpha={x:g} ({method} path)", interpolate(a, b, x, keys, method))
                                       for x in alphas), evaluator, refresh_bn)
    mid = alphas.index(0.5)
    return PathResult(
        method=method, alphas=alphas, metrics=metrics,
        barriers={m: barrier(alphas, v, higher_is_better=m in maximize) for m, v in metrics.items()},
        merge_gain={m: v[mid] - (v[0] + v[-1]) / 2 for m, v in metrics.items()},
    )


# ----------------------------------------------------------------------------- task-arithmetic scaling


@dataclasses.dataclass
class ScalingResult:
    """Metrics of theta_base + lambda * sum_i tau_i over lambdas; plain data."""

    lambdas: list[float]
    metrics: dict[str, list[float]]
    select: str  # metric the best lambda was chosen by
    best_lambda: float
    best_value: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scaling_curve(model: ModelLike, base_sd: StateLike, task_sds: Sequence[StateLike], evaluator: Evaluator,
                  lambdas: Sequence[float], *, refresh_bn: BatchNormRefresh = None, select: str = "loss",
                  maximize: Sequence[str] = MAXIMIZED) -> ScalingResult:
    """Task arithmetic's scaling curve: metrics of theta_base + lambda * sum_i (theta_i - theta_base).

    Ilharco et al., 2023, "Editing models with task arithmetic", arXiv:2212.04089.

    Args:
        base_sd: the pretrained model; task_sds: its fine-tunes.
        lambdas: scaling coefficients to evaluate.
        select: metric that picks the best lambda (max if in `maximize`, else min).
    """
    if not task_sds or not lambdas:
        raise MergeError("scaling_curve needs at least one fine-tuned model and one lambda")
    base = as_state(base_sd)
    tasks = [as_state(t) for t in task_sds]
    keys = float_keys({"base": base, **{f"model {i}": t for i, t in enumerate(tasks)}})
    dtypes = {k: _compute_dtype(base[k]) for k in keys}
    total = {k: sum(t[k].to(dtypes[k]) - base[k].to(dtypes[k]) for t in tasks) for k in keys}  # sum_i tau_i

    def point(lam: float) -> dict[str, Tensor]:
        return {**base, **{k: (base[k].to(dtypes[k]) + lam * total[k]).to(base[k].dtype) for k in keys}}

    metrics = evaluate_points(model, ((f"lambda={lam:g}", point(lam)) for lam in lambdas), evaluator, refresh_bn)
    if select not in metrics:
        raise MergeError(f"scaling_curve: select={select!r} is not among the evaluator's metrics {sorted(metrics)}")
    values = metrics[select]
    best = (max if select in maximize else min)(range(len(values)), key=values.__getitem__)
    return ScalingResult(lambdas=[float(x) for x in lambdas], metrics=metrics, select=select,
                         best_lambda=float(lambdas[best]), best_value=values[best])


# ----------------------------------------------------------------------------- 2-D plane


@dataclasses.dataclass
class PlaneResult:
    """Metrics on a grid in the plane through three models; plain data.

    Coordinates are in weight-space units along an orthonormal basis (e1, e2) built by
    Gram-Schmidt from A - O and B - O: O is at (0, 0), A at (|A - O|, 0), B above the x axis.
    """

    x: list[float]  # grid coordinates along e1
    y: list[float]  # grid coordinates along e2
    metrics: dict[str, list[list[float]]]  # metric -> [iy][ix]
    points: dict[str, list[float]]  # label -> [x, y] of the three models and any extra ones
    off_plane: dict[str, float]  # label -> distance of an extra model from the plane (0 for O, A, B)
    point_metrics: dict[str, dict[str, float]]  # label -> metrics evaluated at that model itself

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flat(state: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    return torch.cat([state[k].double().reshape(-1) for k in keys])


def _unflat(vec: Tensor, like: Mapping[str, Tensor], keys: Sequence[str]) -> dict[str, Tensor]:
    out, start = dict(like), 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[start:start + n].reshape(like[k].shape).to(like[k].dtype)
        start += n
    return out


def _axis(values: Sequence[float], grid: int, margin: float) -> list[float]:
    lo, hi = min(values), max(values)
    pad = margin * (hi - lo)
    return torch.linspace(lo - pad, hi + pad, grid, dtype=torch.float64).tolist()


def plane(model: ModelLike, sd_o: StateLike, sd_a: StateLike, sd_b: StateLike, evaluator: Evaluator,
          grid: int = 11, margin: float = 0.2, *, refresh_bn: BatchNormRefresh = None,
          names: Sequence[str] = ("O", "A", "B"), extra: Mapping[str, StateLike] | None = None) -> PlaneResult:
    """Evaluate a grid x grid lattice in the plane through three models (Garipov et al., 2018, arXiv:1802.10026).

    e1 = (A - O) / |A - O|, e2 = the part of B - O orthogonal to e1, normalised; the point
    (x, y) is O + x e1 + y e2. Each axis spans the three models' coordinates widened by
    `margin` times that span on both sides.

    Args:
        sd_o, sd_a, sd_b: the three models (e.g. base and two fine-tunes, or two fine-tunes and a merge).
        grid: points per axis.
        margin: share of the span added beyond the outermost model on each side.
        names: labels of O, A, B in the result.
        extra: more models (e.g. merges) to place on the plot: they are projected onto the
            plane (their distance from it is reported) and evaluated where they really are.
    """
    if grid < 2 or margin < 0:
        raise MergeError(f"plane: grid must be >= 2 and margin >= 0, got grid={grid}, margin={margin}")
    o, a, b = as_state(sd_o), as_state(sd_a), as_state(sd_b)
    others = {label: as_state(s) for label, s in (extra or {}).items()}
    keys = float_keys({names[0]: o, names[1]: a, names[2]: b, **others})
    origin = _flat(o, keys)
    u, v = _flat(a, keys) - origin, _flat(b, keys) - origin
    e1 = u / u.norm() if u.norm() > 0 else None
    v_perp = v - (v @ e1) * e1 if e1 is not None else v
    if e1 is None or v_perp.norm() <= 1e-9 * max(float(u.norm()), float(v.norm())):
        raise MergeError(f"plane: {names[0]}, {names[1]} and {names[2]} lie on one line (or two coincide); "
                         "pick three models that span a plane")
    e2 = v_perp / v_perp.norm()
    points = {names[0]: [0.0, 0.0], names[1]: [float(u.norm()), 0.0], names[2]: [float(v @ e1), float(v_perp.norm())]}
    off_plane = dict.fromkeys(names[:3], 0.0)
    for label, state in others.items():
        d = _flat(state, keys) - origin
        x, y = float(d @ e1), float(d @ e2)
        points[label], off_plane[label] = [x, y], float((d - x * e1 - y * e2).norm())
    xs = _axis([p[0] for p in points.values()], grid, margin)
    ys = _axis([p[1] for p in points.values()], grid, margin)
    lattice = ((f"plane point (x={x:.4g}, y={y:.4g})", _unflat(origin + x * e1 + y * e2, o, keys))
               for y in ys for x in xs)
    flat = evaluate_points(model, lattice, evaluator, refresh_bn)
    at_models = evaluate_points(model, ((f"model {label}", s) for label, s in
                                         {names[0]: o, names[1]: a, names[2]: b, **others}.items()),
                                 evaluator, refresh_bn)
    return PlaneResult(
        x=xs, y=ys, metrics={m: [vals[i * grid:(i + 1) * grid] for i in range(grid)] for m, vals in flat.items()},
        points=points, off_plane=off_plane,
        point_metrics={label: {m: vals[i] for m, vals in at_models.items()} for i, label in enumerate(points)},
    )
