"""`mergelab extract-lora`: a PEFT adapter from a fine-tune and its base."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mergelab.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add the LoRA commands to the `mergelab` app."""
    app.command("extract-lora")(extract_lora)


def extract_lora(
    finetuned: Path = typer.Argument(..., help="the fine-tuned model folder or file"),
    base: Path = typer.Argument(..., help="the model it was fine-tuned from"),
    out: Path = typer.Argument(..., help="output PEFT adapter folder (written atomically)"),
    rank: int = typer.Option(..., "--rank", "-r", help="LoRA rank R of every layer (at most)"),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", help="also drop singular values <= this"),
    include_embeddings: bool = typer.Option(False, "--include-embeddings",
                                            help="give embeddings a LoRA too (else they are 'other' tensors)"),
    save_other: bool = typer.Option(False, "--save-other",
                                    help="store changed tensors a LoRA cannot hold (norms, ...) as modules_to_save"),
    svd: str = typer.Option("auto", help="auto, full (exact) or randomized SVD"),
    device: str = typer.Option("cpu", help="where the SVDs run: cpu, cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing OUT"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Extract a rank-R LoRA adapter approximating FINETUNED - BASE (MergeKit's mergekit-extract-lora)."""
    from mergelab.lora.extract import extract

    out_console = Console()
    with user_errors():
        report = extract(finetuned, base, out, rank=rank, sv_epsilon=sv_epsilon,
                         include_embeddings=include_embeddings, save_other=save_other, svd=svd, device=device,
                         overwrite=overwrite, show_progress=not quiet)
    table = Table(title=f"extracted {len(report.layers)} LoRA layers into {out} in {report.seconds:.1f} s")
    for col in ("layer", "rank", "energy kept"):
        table.add_column(col)
    rows = sorted(report.layers, key=lambda r: r["energy"])
    for row in rows[:10]:
        table.add_row(row["module"], str(row["rank"]), f"{row['energy']:.4f}")
    if len(rows) > 10:
        table.add_row(f"... {len(rows) - 10} more (see mergelab_extract_report.json)", "", "")
    out_console.print(table)
    if report.saved:
        out_console.print(f"stored whole (modules_to_save): {', '.join(report.saved)}")
    for name, why in report.left_out:
        out_console.print(f"[yellow]left out[/] {name}: {why}")
