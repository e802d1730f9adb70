"""`mergelab unmerge MERGED OUT --task NAME`: one task's model from a tall_masks / emr merge's side files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mergelab.cli.common import CLEAN_PARTIALS, OVERWRITE, out, report_partials, user_errors


def unmerge_command(
    merged_dir: Path = typer.Argument(..., help="output folder of a tall_masks or emr merge "
                                      "(with task_models.json)"),
    out_dir: Path = typer.Argument(..., help="where the task's model folder is written (atomically)"),
    task: str = typer.Option(..., "--task", help="the task: its model's folder name, path or index"),
    base: Optional[Path] = typer.Option(None, "--base", help="the merge's base model (default: the path "
                                        "recorded in task_models.json)"),
    device: str = typer.Option("cpu", "--device", help="where the maths runs: cpu, cuda, cuda:1"),
    out_shard_size: str = typer.Option("5GB", "--out-shard-size", help="maximum size of an output shard"),
    overwrite: bool = OVERWRITE,
    clean_partials: bool = CLEAN_PARTIALS,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Rebuild one task's model from a tall_masks or emr merge (its masks and rescalers beside the model)."""
    from mergelab.checkpoint.writer import parse_size
    from mergelab.task_models import write_task_model

    with user_errors():
        report_partials(out_dir, clean_partials)
        index: str | int = int(task) if task.isdigit() else task
        report = write_task_model(merged_dir, out_dir, index, base=base, overwrite=overwrite, device=device,
                                  shard_size=parse_size(out_shard_size), show_progress=not quiet)
    out.print(f"task {task}: {report.tensors} tensors written to {report.out_dir} in {report.seconds:.1f} s",
              soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `unmerge` to the mergelab command."""
    app.command("unmerge")(unmerge_command)
