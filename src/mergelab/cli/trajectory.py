"""`mergelab average` and `mergelab recover`: a run's checkpoints averaged in one engine pass.

The work is in mergelab.trajectory (imported when a command runs, so that
`mergelab --help` does not load torch); this module only parses flags and
renders the report the library returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mergelab.cli.common import CLEAN_PARTIALS, OVERWRITE, out, report_partials, user_errors
from mergelab.cli.flags import with_flags


def show_report(report, title: str) -> None:
    """The checkpoints used (step, weight) and those skipped with the reason, then tensors from fewer."""
    table = Table(title=title)
    for col in ("step", "checkpoint", "weight"):
        table.add_column(col)
    rows = [(step, Path(path).name, f"{weight:.4f}") for step, path, weight in report.used]
    rows += [(step, Path(path).name, f"[red]skipped[/]: {why}") for step, path, why in report.skipped]
    for step, name, cell in sorted(rows, key=lambda r: r[0]):
        table.add_row(str(step), name, cell)
    out.print(table)
    if report.partial:
        out.print(f"[yellow]{len(report.partial)} tensor(s) came from fewer checkpoints[/] (listed in the "
                  "output's JSON): " + ", ".join(list(report.partial)[:5]))


ALLOW_MISSING = typer.Option(False, "--allow-missing-tensors", help="average a tensor that only some checkpoints "
                             "hold over those (reported); refused otherwise")
QUIET = typer.Option(False, "--quiet", help="no progress bar")


def average(
    run_dir: Path = typer.Argument(..., help="folder of a training run's checkpoints"),
    out_dir: Path = typer.Argument(..., help="output folder (written atomically)"),
    scheme: str = typer.Option("sma", help="sma | wma | ema | lawa | wsm"),
    last: Optional[int] = typer.Option(None, help="average only the newest K checkpoints"),
    every: int = typer.Option(1, help="take every N-th checkpoint, counting back from the newest"),
    decay: str = typer.Option("linear", help="wsm decay shape: linear | cosine | 1-sqrt"),
    alpha: float = typer.Option(0.9, help="ema decay per checkpoint"),
    skip_unstable: bool = typer.Option(False, "--skip-unstable", help="leave out NaN/Inf checkpoints and those "
                                       "after a loss spike"),
    checkpoint: Optional[list[Path]] = typer.Option(None, "--checkpoint", help="use these checkpoints "
                                                    "(repeatable) instead of discovering them in RUN_DIR"),
    out_shard_size: str = typer.Option("5GB", help="maximum size of an output shard"),
    allow_missing_tensors: bool = ALLOW_MISSING,
    overwrite: bool = OVERWRITE,
    clean_partials: bool = CLEAN_PARTIALS,
    quiet: bool = QUIET,
) -> None:
    """Average the checkpoints of one training run (SMA, WMA, EMA, LAWA, WSM)."""
    from mergelab.trajectory.run import average_run

    with user_errors():
        report_partials(out_dir, clean_partials)
        report = average_run(run_dir, out_dir, scheme=scheme, last=last, every=every, decay=decay, alpha=alpha,
                             skip_unstable=skip_unstable, out_shard_size=out_shard_size, overwrite=overwrite,
                             show_progress=not quiet, explicit=checkpoint or None,
                             allow_missing_tensors=allow_missing_tensors)
    show_report(report, f"{scheme} average of {len(report.used)} checkpoints")
    out.print(with_flags(report.correlation["recommendation"]))


def recover(
    run_dir: Path = typer.Argument(..., help="folder of a crashed or diverged training run"),
    out_dir: Path = typer.Argument(..., help="folder training can resume from"),
    last: int = typer.Option(3, help="how many of the newest stable checkpoints to average (1 or more)"),
    allow_missing_tensors: bool = ALLOW_MISSING,
    overwrite: bool = OVERWRITE,
    clean_partials: bool = CLEAN_PARTIALS,
    quiet: bool = QUIET,
) -> None:
    """Average the last stable checkpoints of a run into a folder training can resume from."""
    from mergelab.trajectory.run import recover_run

    with user_errors():
        report_partials(out_dir, clean_partials)
        report = recover_run(run_dir, out_dir, last=last, overwrite=overwrite, show_progress=not quiet,
                             allow_missing_tensors=allow_missing_tensors)
    show_report(report, f"recovering from {len(report.used)} stable checkpoints")
    newest = Path(report.used[-1][1]).name
    out.print(f"wrote {out_dir}; resume state copied from {newest}: {', '.join(report.copied_files) or 'none found'}")


def register(app: typer.Typer) -> None:
    """Add `average` and `recover` to the `mergelab` command."""
    app.command("average")(average)
    app.command("recover")(recover)
