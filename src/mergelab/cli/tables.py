"""rich tables of the analysis results, for the command line (the library returns data, never prints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from mergelab.analysis.noise_scale import NoiseScale
    from mergelab.analysis.paths import PathResult, PlaneResult, ScalingResult


def render_path(result: PathResult) -> Table:
    """rich Table of a path: one row per alpha, then barrier and merge gain per metric."""
    table = Table(title=f"{result.method} interpolation path")
    names = list(result.metrics)
    table.add_column("alpha", justify="right")
    for m in names:
        table.add_column(m, justify="right")
    for i, alpha in enumerate(result.alphas):
        table.add_row(f"{alpha:.3g}", *(f"{result.metrics[m][i]:.4g}" for m in names))
    table.add_section()
    table.add_row("barrier", *(f"{result.barriers[m]:.4g}" for m in names))
    table.add_row("merge gain", *(f"{result.merge_gain[m]:+.4g}" for m in names))
    return table


def render_scaling(result: ScalingResult) -> Table:
    """rich Table of a scaling curve, the best lambda marked."""
    table = Table(title=f"task-arithmetic scaling curve (best lambda {result.best_lambda:g} by {result.select})")
    names = list(result.metrics)
    table.add_column("lambda", justify="right")
    for m in names:
        table.add_column(m, justify="right")
    for i, lam in enumerate(result.lambdas):
        mark = " *" if lam == result.best_lambda else ""
        table.add_row(f"{lam:g}{mark}", *(f"{result.metrics[m][i]:.4g}" for m in names))
    return table


def render_plane(result: PlaneResult) -> Table:
    """rich Table of the models placed on a plane: coordinates, distance off it, metrics."""
    table = Table(title=f"loss plane, {len(result.x)} x {len(result.y)} grid")
    names = sorted({m for metrics in result.point_metrics.values() for m in metrics})
    for col in ("model", "x", "y", "off plane", *names):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, (x, y) in result.points.items():
        table.add_row(label, f"{x:.4g}", f"{y:.4g}", f"{result.off_plane[label]:.3g}",
                      *(f"{result.point_metrics[label][m]:.4g}" for m in names))
    return table


def render_noise_scale(result: NoiseScale) -> Table:
    """rich Table of a noise scale, its inputs and the assumptions made reading them."""
    table = Table(title=f"effective noise scale S = lr / (B (1 - m)^{result.k:g}) x v_aug")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in (("S", f"{result.noise_scale:.4g}"), ("learning rate", f"{result.lr:g}"),
                        ("batch size B", str(result.batch_size)), ("momentum m", f"{result.momentum:g}"),
                        ("augmentation variance", f"{result.augmentation_variance:g}")):
        table.add_row(name, value)
    for note in result.notes:
        table.add_row("note", note)
    return table
