"""rich tables of the analysis results, for the command line (the library returns data, never prints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from mergelab.analysis.inspect import InspectReport
    from mergelab.analysis.noise_scale import NoiseScale
    from mergelab.analysis.paths import PathResult, PlaneResult, ScalingResult


def _metric_table(title: str, first: str, metrics: list[str]) -> Table:
    """A table whose first column is `first` (alpha, lambda) and then one right-aligned column per metric."""
    table = Table(title=title)
    for col in (first, *metrics):
        table.add_column(col, justify="right")
    return table


def render_path(result: PathResult) -> Table:
    """rich Table of a path: one row per alpha, then barrier and merge gain per metric."""
    names = list(result.metrics)
    table = _metric_table(f"{result.method} interpolation path", "alpha", names)
    for i, alpha in enumerate(result.alphas):
        table.add_row(f"{alpha:.3g}", *(f"{result.metrics[m][i]:.4g}" for m in names))
    table.add_section()
    table.add_row("barrier", *(f"{result.barriers[m]:.4g}" for m in names))
    table.add_row("merge gain", *(f"{result.merge_gain[m]:+.4g}" for m in names))
    return table


def render_scaling(result: ScalingResult) -> Table:
    """rich Table of a scaling curve, the best lambda marked."""
    names = list(result.metrics)
    table = _metric_table(f"task-arithmetic scaling curve (best lambda {result.best_lambda:g} by {result.select})",
                          "lambda", names)
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


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_inspect(report: InspectReport, recommendations: list[str] | None = None) -> list[Table]:
    """rich Tables: per group, per model pair (overall), and the recommendation."""
    from mergelab.analysis.geometry import MASS_DENSITIES
    from mergelab.analysis.recommend import percent, recommend, short_names
    from mergelab.cli.flags import with_flags

    n = len(report.models)
    per_group = Table(title=f"Task-vector geometry per layer (task vectors from the {report.reference})")
    for col in ("group", "params", "|tau|/|ref|", "cos(tau)", "sign conflict",
                f"conflict @{report.density}", "spectral overlap", *(f"mass @{d}" for d in MASS_DENSITIES)):
        per_group.add_column(col, justify="left" if col == "group" else "right")
    summaries = [*report.kinds.values(), report.overall]  # drawn in bold below the layers
    for g in [*report.groups, *summaries]:
        mass = [[v for v in g.mass_kept[str(d)] if v is not None] for d in MASS_DENSITIES]
        per_group.add_row(
            f"[bold]{g.name}[/bold]" if any(g is x for x in summaries) else g.name, f"{g.n_params:,}",
            _f(g.relative_task_norm), _f(g.mean_task_cosine), percent(g.sign_conflict),
            percent(g.sign_conflict_trimmed), _f(g.mean_spectral_overlap, 2),
            *(percent(sum(m) / len(m)) if m else "-" for m in mass))
    pairs = Table(title="Model pairs (whole model)")
    for col in ("model i", "model j", "weight cosine", "task-vector cosine", "spectral overlap"):
        pairs.add_column(col, justify="right" if "cos" in col or "overlap" in col else "left")
    o = report.overall
    names = short_names(report.models)
    for i in range(n):
        for j in range(i + 1, n):
            overlap = None if o.spectral_overlap is None else o.spectral_overlap[i][j]
            pairs.add_row(names[i], names[j], _f(o.weight_cosine[i][j]),
                          _f(o.task_cosine[i][j]), _f(overlap, 2))
    advice = Table(title="Recommendation", show_lines=True)
    advice.add_column("#", justify="right")
    advice.add_column("method and reason")
    for k, line in enumerate(recommendations if recommendations is not None else recommend(report), 1):
        advice.add_row(str(k), with_flags(line))
    return [per_group, pairs, advice]
