"""PNG plots of the analyses, drawn with matplotlib's Agg canvas.

Figures are built with `matplotlib.figure.Figure` and an Agg canvas directly, not
pyplot, so plotting neither needs a display nor touches pyplot's global state
(safe in tests, threads and notebooks alike). Each function writes one PNG and
returns its path. matplotlib is the `plots` extra: `figure()` imports it, or
raises MissingExtra naming the extra.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from typing import Any

from mergelab.analysis.inspect import InspectReport
from mergelab.analysis.recommend import short_names
from mergelab.analysis.paths import PathResult, PlaneResult, ScalingResult
from mergelab.errors import MergeError
from mergelab.extras import require


def figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure on an Agg canvas of its own (no pyplot state); MissingExtra without matplotlib."""
    Figure = require("matplotlib.figure", "plotting").Figure
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "plotting").FigureCanvasAgg
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def plot_layer_similarity(report: InspectReport, path: str | Path) -> Path:
    """Heat map of pairwise task-vector cosine: one row per model pair, one column per layer/group."""
    n = len(report.models)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        pairs = [(0, 0)]  # one model with a base: show its self-similarity row rather than nothing
    grid = np.array([[_nan(g.task_cosine[i][j]) for g in report.groups] for i, j in pairs])
    longest = max(len(g.name) for g in report.groups)  # rotated tick labels need room below the map
    fig = figure((max(6.0, 0.35 * len(report.groups) + 3), 1.5 + 0.45 * len(pairs) + 0.07 * longest))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(report.groups)), [g.name for g in report.groups], rotation=90, fontsize=7)
    names = short_names(report.models)
    labels = [f"{names[i]} / {names[j]}" for i, j in pairs]
    ax.set_yticks(range(len(pairs)), labels, fontsize=7)
    ax.set_title(f"task-vector cosine per layer (from the {report.reference})")
    fig.colorbar(image, ax=ax, label="cosine")
    return _save(fig, path)


def plot_path(result: PathResult, path: str | Path) -> Path:
    """Metrics along an interpolation path, with the chord between the endpoints dashed."""
    fig = figure((6, 4))
    ax = fig.add_subplot()
    axes = {name: (ax if k == 0 else ax.twinx()) for k, name in enumerate(list(result.metrics)[:2])}
    for (name, axis), color in zip(axes.items(), ("tab:blue", "tab:orange")):
        values = result.metrics[name]
        axis.plot(result.alphas, values, "o-", color=color, label=name)
        axis.plot([0, 1], [values[0], values[-1]], "--", color=color, alpha=0.5)
        axis.set_ylabel(f"{name} (barrier {result.barriers[name]:.3g})", color=color)
    ax.set_xlabel("alpha  (0 = model A, 1 = model B)")
    ax.set_title(f"{result.method} interpolation")
    return _save(fig, path)


def plot_scaling_curve(result: ScalingResult, path: str | Path) -> Path:
    """Metric against lambda for theta_base + lambda * sum tau_i, the best lambda marked."""
    fig = figure((6, 4))
    ax = fig.add_subplot()
    values = result.metrics[result.select]
    ax.plot(result.lambdas, values, "o-")
    ax.axvline(result.best_lambda, color="gray", linestyle=":", label=f"best lambda {result.best_lambda:g}")
    ax.set_xlabel("lambda")
    ax.set_ylabel(result.select)
    ax.set_title("task-arithmetic scaling curve")
    ax.legend()
    return _save(fig, path)


def plot_plane(result: PlaneResult, path: str | Path, metric: str | None = None) -> Path:
    """Filled contours of `metric` (default: "loss" if evaluated, else the first metric) on the
    plane, the models placed on it marked and labelled."""
    if metric is None:
        metric = "loss" if "loss" in result.metrics else next(iter(result.metrics))
    if metric not in result.metrics:
        raise MergeError(f"plot_plane: metric {metric!r} was not evaluated; the plane has {sorted(result.metrics)}")
    z = np.array(result.metrics[metric])
    fig = figure((6, 5))
    ax = fig.add_subplot()
    levels = np.unique(np.quantile(z, np.linspace(0, 1, 21)))  # quantile levels resolve the valleys
    filled = ax.contourf(result.x, result.y, z, levels=levels if len(levels) > 1 else 10, cmap="viridis")
    fig.colorbar(filled, ax=ax, label=metric)
    for k, (label, (x, y)) in enumerate(result.points.items()):
        # The first three span the plane (stars); later ones are projections of extra models.
        ax.plot(x, y, "w*" if k < 3 else "wo", markersize=10, markeredgecolor="k")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), color="white", fontsize=9)
    ax.set_xlabel("e1 (towards the second model)")
    ax.set_ylabel("e2")
    ax.set_title(f"{metric} in the plane of three models")
    return _save(fig, path)
