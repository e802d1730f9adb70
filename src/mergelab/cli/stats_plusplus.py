"""`mergelab stats gram-plusplus`: RegMean++ statistics of Hugging Face folders (stats/gram_sequential.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mergelab.cli.common import OVERWRITE, check_outputs, out, user_errors


def stats_gram_plusplus(
        models: list[Path] = typer.Argument(..., help="the fine-tuned model folders, in the recipe's order"),
        data: list[Path] = typer.Option(..., "--data", help="one text or JSONL file per model, same order"),
        out_files: list[Path] = typer.Option(..., "--out", help="one stats file per model, same order"),
        weight: Optional[list[float]] = typer.Option(None, "--weight", help="the recipe's weight, one per model"),
        alpha: float = typer.Option(0.1, help="the recipe's regmean_plusplus alpha"),
        blocks: Optional[str] = typer.Option(None, help="the nn.ModuleList of blocks (default: the longest)"),
        max_examples: int = typer.Option(256, help="examples read from each data file"),
        seq_len: int = typer.Option(128, help="tokens per example"),
        batch_size: int = typer.Option(8), overwrite: bool = OVERWRITE) -> None:
    """RegMean++ Gram matrices (regmean_plusplus): merged block by block, each block's Grams taken
    with the merged earlier blocks. Use the same --weight and --alpha in the recipe."""
    from mergelab.errors import StatsError
    from mergelab.stats.gram_sequential import gram_plusplus_for
    from mergelab.stats.io import save_stats

    with user_errors():
        if not len(models) == len(data) == len(out_files) or (weight and len(weight) != len(models)):
            raise StatsError(f"give one --data and one --out (and, if any, one --weight) per model: "
                             f"{len(models)} models, {len(data)} --data, {len(out_files)} --out")
        inputs = [*models, *data]
        check_outputs([(f, "file", "stats file") for f in out_files], inputs, overwrite)
        res = gram_plusplus_for(models, data, weights=weight, alpha=alpha, blocks=blocks,
                                max_examples=max_examples, seq_len=seq_len, batch_size=batch_size)
        for f, st in zip(out_files, res.stats):
            save_stats(f, st, inputs=inputs, overwrite=overwrite)
        out.print(f"wrote {len(out_files)} RegMean++ stats files; list them as each model's `stats:` in a "
                  f"recipe with merge_method: regmean_plusplus and alpha {alpha:g}")


def register(stats_app: typer.Typer) -> None:
    """Add `gram-plusplus` to the `mergelab stats` group."""
    stats_app.command("gram-plusplus")(stats_gram_plusplus)
