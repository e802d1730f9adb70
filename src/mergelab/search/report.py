"""What soups, sweeps and searches show: a progress bar, tables, PNG plots, atomic files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table



# ----------------------------------------------------------------------------- files


def check_new(path: Path, overwrite: bool, protected: Sequence[Path] = ()) -> None:
    """Refuse to write over an input (or inside one), or over an existing output without overwrite.

    The rules every mergelab writer follows: mergelab.checkpoint.output.check_output.
    """
    from mergelab.checkpoint.output import check_output

    check_output(path, kind="file", inputs=protected, overwrite=overwrite, what="output")


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) for a temporary file beside `path` (checked with check_new first), then rename it into place."""
    from mergelab.checkpoint.output import atomic_file

    with atomic_file(path, overwrite=True, checked=True) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, payload: Any) -> Path:
    return write_text(path, json.dumps(payload, indent=2, default=str))


def _save(fig: Any, path: Path) -> Path:
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def _figure(size=(7, 4.5)):
    from mergelab.analysis.plots import figure

    fig = figure(size)  # its own canvas: no pyplot state; names the plots extra without matplotlib
    return fig, fig.add_subplot()


# ----------------------------------------------------------------------------- progress


class CountProgress:
    """A bar over candidates with the best value so far; silent when disabled."""

    def __init__(self, total: int, label: str, *, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self._p: Progress | None = None

    def __enter__(self) -> CountProgress:
        if self.enabled:
            self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                               transient=not sys.stderr.isatty())
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=self.total, note="")
        return self

    def advance(self, note: str | None = None) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, **({"note": note} if note is not None else {}))

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)


# ----------------------------------------------------------------------------- soups


def soup_table(r: Any) -> Table:
    key = r.objective.metric
    t = Table(title=f"{r.kind} soup, {r.objective} ({r.evaluations} evaluations)")
    for col in ("step", "candidate", "soup size", key, "kept"):
        t.add_column(col, justify="left" if col == "candidate" else "right")
    for name, m in r.ingredients.items():
        t.add_row("alone", name, "1", f"{m[key]:.4f}", "")
    for i, s in enumerate(r.steps):
        t.add_row(str(i), s.added, str(len(s.members)), f"{s.metrics[key]:.4f}", "yes" if s.kept else "no")
    return t


def plot_soup(r: Any, path: Path, labels: dict[str, str] | None = None) -> Path:
    """Held-out score of every greedy step (kept: filled, rejected: hollow) beside each model alone."""
    key = r.objective.metric
    short = labels or {}
    fig, ax = _figure((max(6.0, 0.9 * len(r.steps) + 3), 4.5))
    xs = range(len(r.steps))
    ys = [s.metrics[key] for s in r.steps]
    ax.plot(xs, [r.steps[0].metrics[key]] + [max(ys[:i + 1]) if r.objective.maximize else min(ys[:i + 1])
                                              for i in range(1, len(ys))], color="grey", lw=1, ls=":")
    for x, s in zip(xs, r.steps):
        ax.scatter([x], [s.metrics[key]], s=60, color="C0", facecolors="C0" if s.kept else "none", zorder=3)
    singles = [r.ingredients.get(s.added, {}).get(key) for s in r.steps]
    if any(v is not None for v in singles):
        ax.scatter(list(xs), [v if v is not None else float("nan") for v in singles], marker="x", color="C3",
                   label="that model alone")
    ax.set_xticks(list(xs), [("+ " if i else "") + short.get(s.added, s.added) for i, s in enumerate(r.steps)],
                  rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"held-out {key}")
    ax.set_title(f"{r.kind} soup: filled = kept, hollow = rejected; final {r.metrics[key]:.4f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- sweeps


def sweep_table(r: Any) -> Table:
    fields = list(r.points[0])
    metrics = sorted({k for m in r.metrics if m for k in m})
    t = Table(title=f"sweep of {len(r.points)} points; * = Pareto-optimal for {', '.join(map(str, r.objectives))}")
    for col in (*fields, *metrics, "front"):
        t.add_column(col, justify="right")
    for i, (p, m, e) in enumerate(zip(r.points, r.metrics, r.errors)):
        cells = [f"{p[f]:.4g}" for f in fields]
        cells += [f"{m[k]:.4f}" for k in metrics] if m else ["failed"] + [""] * (len(metrics) - 1)
        t.add_row(*cells, "*" if i in r.front else "")
    return t


def plot_sweep(r: Any, path: Path) -> Path:
    """Two objectives or more: the first two against each other, the front joined; one: curve over the first field."""
    fig, ax = _figure()
    ok = [i for i, m in enumerate(r.metrics) if m is not None]
    if len(r.objectives) >= 2:
        o0, o1 = r.objectives[0].metric, r.objectives[1].metric
        ax.scatter([r.metrics[i][o0] for i in ok], [r.metrics[i][o1] for i in ok], color="C0", alpha=0.5,
                   label="grid point")
        front = sorted(r.front, key=lambda i: r.metrics[i][o0])
        ax.plot([r.metrics[i][o0] for i in front], [r.metrics[i][o1] for i in front], "o-", color="C3",
                label="Pareto front")
        for i in front:
            ax.annotate(", ".join(f"{v:.2g}" for v in r.points[i].values()), (r.metrics[i][o0], r.metrics[i][o1]),
                        fontsize=7, textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(str(r.objectives[0]))
        ax.set_ylabel(str(r.objectives[1]))
    else:
        field = list(r.points[0])[0]
        o = r.objectives[0].metric
        ax.plot([r.points[i][field] for i in ok], [r.metrics[i][o] for i in ok], "o-", color="C0")
        for i in r.front:
            ax.scatter([r.points[i][field]], [r.metrics[i][o]], s=120, facecolors="none", edgecolors="C3",
                       label="best")
        ax.set_xlabel(field)
        ax.set_ylabel(str(r.objectives[0]))
    ax.set_title(f"sweep: {len(r.points)} points, {len(r.front)} on the front")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- searches


def search_table(r: Any, top: int = 10) -> Table:
    objs = r.objectives
    t = Table(title=f"search ({r.sampler}): {len(r.trials)} trials; best {'trial' if len(objs) == 1 else 'Pareto set'}")
    t.add_column("trial", justify="right")
    for o in objs:
        t.add_column(str(o), justify="right")
    t.add_column("parameters", overflow="fold")
    for n in r.best[:top]:
        tr = next(x for x in r.trials if x["number"] == n)
        t.add_row(str(n), *[f"{tr['metrics'][o.metric]:.4f}" for o in objs],
                  ", ".join(f"{k}={v:.3g}" for k, v in tr["params"].items()))
    failed = sum(1 for x in r.trials if x["state"] == "FAIL")
    if failed:
        t.caption = f"{failed} candidate(s) failed (their errors are in the JSON)"
    return t


def plot_search(r: Any, path: Path) -> Path:
    """One objective: value of every trial and the best so far; several: the first two, Pareto set marked."""
    fig, ax = _figure()
    ok = [t for t in r.trials if t["state"] == "COMPLETE"]
    objs = r.objectives
    if len(objs) == 1:
        o = objs[0]
        xs = [t["number"] for t in ok]
        ys = [t["metrics"][o.metric] for t in ok]
        ax.scatter(xs, ys, s=12, color="C0", alpha=0.6, label="candidate")
        best, run = [], None
        for y in ys:
            run = y if run is None or o.better(y, run) else run
            best.append(run)
        ax.step(xs, best, where="post", color="C3", label="best so far")
        failed = [t["number"] for t in r.trials if t["state"] == "FAIL"]
        if failed and ys:
            ax.scatter(failed, [min(ys) if o.maximize else max(ys)] * len(failed), marker="x", color="k",
                       label="failed")
        ax.set_xlabel("trial")
        ax.set_ylabel(str(o))
    else:
        a, b = objs[0].metric, objs[1].metric
        ax.scatter([t["metrics"][a] for t in ok], [t["metrics"][b] for t in ok], s=12, alpha=0.5, label="candidate")
        best = sorted((t for t in ok if t["number"] in r.best), key=lambda t: t["metrics"][a])
        ax.plot([t["metrics"][a] for t in best], [t["metrics"][b] for t in best], "o-", color="C3",
                label="Pareto set")
        ax.set_xlabel(str(objs[0]))
        ax.set_ylabel(str(objs[1]))
    ax.set_title(f"search with {r.sampler}: {len(r.trials)} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
