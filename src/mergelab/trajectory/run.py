"""`mergelab average` and `mergelab recover`: discovery, selection, weights, then a streamed average."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mergelab.checkpoint.writer import parse_size
from mergelab.checkpoint.output import check_output
from mergelab.errors import CheckpointError, InvalidInput
from mergelab.trajectory.average import average_checkpoints
from mergelab.trajectory.discovery import RunCheckpoint, discover, select
from mergelab.trajectory.recover import resume_files, stable_checkpoints
from mergelab.trajectory.schedules import scheme_weights


def _show(console: Console | None, chosen, weights, skipped, title: str) -> None:
    if console is None:
        return
    table = Table(title=title)
    for col in ("step", "checkpoint", "weight"):
        table.add_column(col)
    for c, w in zip(chosen, weights):
        table.add_row(str(c.step), c.path.name, f"{w:.4f}")
    for c, why in skipped:
        table.add_row(str(c.step), c.path.name, f"[red]skipped[/]: {why}")
    console.print(table)


def plan_average(run_dir, *, scheme: str = "sma", last: int | None = None, every: int = 1,
                 decay: str = "linear", alpha: float = 0.9, skip_unstable: bool = False,
                 explicit=None) -> tuple[list[RunCheckpoint], list[float], list]:
    """Which checkpoints, with which weights, and which were skipped and why."""
    found = discover(run_dir, explicit=explicit)
    skipped: list = []
    if skip_unstable:
        found, skipped = stable_checkpoints(Path(run_dir), found)
        if not found:
            raise CheckpointError(f"every checkpoint in {run_dir} is unstable: " + "; ".join(
                f"{c.path.name}: {why}" for c, why in skipped))
    chosen = select(found, last=last, every=every)
    weights = scheme_weights(scheme, len(chosen), alpha=alpha, decay=decay)
    return chosen, weights, skipped


def _with_partial(info: dict):
    """extra_files_fn: the JSON summary, with the deviation cosines and the tensors from fewer checkpoints."""
    name = next(iter(info))
    body = info[name]

    def files(report) -> dict[str, str]:
        return {name: json.dumps({**body, "correlation": report.correlation,
                                  "tensors_from_fewer_checkpoints": report.partial}, indent=2)}
    return files


def average_run(run_dir, out_dir, *, scheme="sma", last=None, every=1, decay="linear", alpha=0.9,
                skip_unstable=False, out_shard_size="5GB", overwrite=False, show_progress=True,
                console: Console | None = None, explicit=None, allow_missing_tensors: bool = False):
    shard_size = parse_size(out_shard_size)
    check_output(out_dir, kind="folder", inputs=[run_dir, *(explicit or [])], overwrite=overwrite,
                 what="output folder")
    chosen, weights, skipped = plan_average(run_dir, scheme=scheme, last=last, every=every, decay=decay,
                                            alpha=alpha, skip_unstable=skip_unstable, explicit=explicit)
    _show(console, chosen, weights, skipped, f"{scheme} average of {len(chosen)} checkpoints")
    info = {"scheme": scheme, "decay": decay if scheme == "wsm" else None, "alpha": alpha if scheme == "ema" else None,
            "used": [{"step": c.step, "path": str(c.path), "weight": w} for c, w in zip(chosen, weights)],
            "skipped": [{"step": c.step, "path": str(c.path), "why": why} for c, why in skipped]}
    report = average_checkpoints(chosen, weights, out_dir, shard_size=shard_size,
                                 overwrite=overwrite, show_progress=show_progress,
                                 extra_files_fn=_with_partial({"mergelab_average.json": info}),
                                 allow_missing_tensors=allow_missing_tensors)
    _show_partial(console, report)
    if console is not None:
        console.print(report.correlation["recommendation"])
    report.skipped = [(c.step, str(c.path), why) for c, why in skipped]
    return report


def _show_partial(console: Console | None, report) -> None:
    if console is not None and report.partial:
        console.print(f"[yellow]{len(report.partial)} tensor(s) came from fewer checkpoints[/] (listed in the "
                      "output's JSON): " + ", ".join(list(report.partial)[:5]))


def recover_run(run_dir, out_dir, *, last: int = 3, overwrite: bool = False, console: Console | None = None,
                allow_missing_tensors: bool = False):
    """Average the newest `last` stable checkpoints; copy the newest stable one's optimizer state beside them.

    The optimizer/scheduler/trainer state is copied into the output's temporary
    folder with the weights, so the folder appears complete or not at all.
    """
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise InvalidInput(f"last must be a whole number of checkpoints, 1 or more (got {last!r}); "
                           "--last 3 averages the three newest stable checkpoints")
    check_output(out_dir, kind="folder", inputs=[run_dir], overwrite=overwrite, what="output folder")
    found = discover(run_dir)
    stable, skipped = stable_checkpoints(Path(run_dir), found)
    if not stable:
        raise CheckpointError(f"no stable checkpoint in {run_dir}: " + "; ".join(
            f"{c.path.name}: {why}" for c, why in skipped))
    chosen = stable[-min(last, len(stable)):]
    weights = scheme_weights("sma", len(chosen))
    _show(console, chosen, weights, skipped, f"recovering from {len(chosen)} stable checkpoints")
    info = {"used": [{"step": c.step, "path": str(c.path)} for c in chosen],
            "skipped": [{"step": c.step, "path": str(c.path), "why": why} for c, why in skipped],
            "resume_state_from": str(chosen[-1].path)}
    resume = resume_files(chosen[-1])
    copied = list(resume)
    report = average_checkpoints(chosen, weights, out_dir, overwrite=overwrite, show_progress=console is not None,
                                 extra_files_fn=_with_partial({"mergelab_recover.json": info}),
                                 copy_files=resume, allow_missing_tensors=allow_missing_tensors)
    _show_partial(console, report)
    if console is not None:
        console.print(f"wrote {out_dir}; resume state copied from {chosen[-1].path.name}: {', '.join(copied) or 'none found'}")
    report.skipped = [(c.step, str(c.path), why) for c, why in skipped]
    return report
