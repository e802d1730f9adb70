"""`mergelab align A B OUT`: write B with its hidden units permuted into A's basis."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mergelab.cli.common import out, user_errors


def align_command(
    model_a: Path = typer.Argument(..., help="reference model: Hugging Face folder, or a state-dict file/folder"),
    model_b: Path = typer.Argument(..., help="the model to permute into A's basis (same architecture and widths)"),
    out_dir: Path = typer.Argument(..., help="output model folder (B aligned; with alignment.json)"),
    method: str = typer.Option("weight", "--method", help="weight (weight matching, no data) or activation"),
    data: Optional[Path] = typer.Option(None, "--data", help="activation matching: text file or token ids (.pt) "
                                        "for a Hugging Face model; a torch file of inputs ({'X': ...} or (X, y)) "
                                        "with --model"),
    model: Optional[str] = typer.Option(None, "--model", help="module:factory or file.py:factory building the "
                                        "network of a plain state dict (its permutation spec is traced)"),
    seed: int = typer.Option(0, "--seed", help="order in which weight matching visits the groups"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing OUT_DIR"),
) -> None:
    """Permutation alignment (Git Re-Basin): B permuted into A's basis, computing the same function as B.

    Supports BERT, Llama/Mistral/Qwen2 and GPT-2 folders (heads, MLP units and the residual stream) and any network torch.fx can trace (--model). Follow with `mergelab merge` or `mergelab analyze path` on A and OUT_DIR.
    """
    from mergelab.align.files import align_checkpoints

    with user_errors():
        summary = align_checkpoints(model_a, model_b, out_dir, method=method, data=data, model_factory=model,
                                    overwrite=overwrite, seed=seed)
    obj = summary["objective"]
    gain = f", weight-matching objective {obj[0]:.4g} -> {obj[-1]:.4g}" if obj else ""
    out.print(f"aligned {model_b} to {model_a} by {summary['method']}: {summary['moved']} of {summary['groups']} "
              f"groups permuted in {summary['seconds']:.2f} s{gain}; written to {out_dir}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `align` to the mergelab command."""
    app.command("align")(align_command)
