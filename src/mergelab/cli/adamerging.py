"""`mergelab adamerging BASE FT... --data TASK=FILE ... --out RECIPE.yml`: AdaMerging's learned coefficients
as a task_arithmetic recipe (mergelab.search.adamerging)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mergelab.cli.common import OVERWRITE, check_outputs, out, user_errors, write_json
from mergelab.errors import InvalidInput


def _data(specs: list[str], n_models: int) -> dict[str, Path]:
    """--data TASK=FILE (or FILE, the task named by its stem), one per fine-tuned model, in their order."""
    data: dict[str, Path] = {}
    for spec in specs:
        task, sep, file = spec.partition("=")
        task, file = (task, file) if sep else (Path(spec).stem, spec)
        if not task or not file:
            raise InvalidInput(f"--data {spec!r}: expected TASK=FILE")
        if task in data:
            raise InvalidInput(f"--data: task {task!r} is given twice")
        if not Path(file).is_file():
            raise InvalidInput(f"--data {spec!r}: {file} is not a file")
        data[task] = Path(file)
    if len(data) != n_models:
        raise InvalidInput(f"--data was given {len(data)} time(s) for {n_models} fine-tuned model(s); give one "
                           "TASK=FILE per model, in the models' order")
    return data


def adamerging_command(
    base: Path = typer.Argument(..., help="the base model (a Hugging Face folder; with --model any checkpoint)"),
    models: list[Path] = typer.Argument(..., help="the fine-tuned models, one per task"),
    data: list[str] = typer.Option(..., "--data", help="TASK=FILE: a task's unlabelled inputs, a text file (one "
                                   "example per line) or a .safetensors file of input_ids (with --model: of "
                                   "one tensor of input rows); once per model, in the models' order"),
    model: Optional[str] = typer.Option(None, "--model", help="module:factory or file.py:factory building the "
                                        "architecture (an nn.Module whose forward returns logits), for weight "
                                        "files that are no Hugging Face folders"),
    out_file: Path = typer.Option(..., "--out", help="the recipe to write (YAML, merge it with `mergelab merge`)"),
    granularity: str = typer.Option("task", "--granularity", help="task: one coefficient per model; layer: one "
                                    "per model and parameter tensor"),
    steps: int = typer.Option(1000, "--steps", help="Adam steps on the coefficients"),
    lr: float = typer.Option(1e-3, "--lr", help="Adam's learning rate"),
    init: float = typer.Option(0.3, "--init", help="initial value of every coefficient"),
    clamp: bool = typer.Option(False, "--clamp", help="clamp the coefficients to [0, 1]"),
    seed: int = typer.Option(0, "--seed", help="seed of the batch order"),
    device: str = typer.Option("cpu", "--device", help="where the forward passes run: cpu, cuda, cuda:1"),
    head: str = typer.Option("auto", "--head", help="auto (from config.json), lm or classification"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer folder for text files "
                                             "(default: BASE)"),
    batch_size: int = typer.Option(16, "--batch-size", help="examples per batch"),
    max_length: int = typer.Option(128, "--max-length", help="tokens per text example (longer are cut)"),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="examples read per task"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the coefficients and the loss "
                                            "curve as JSON"),
    overwrite: bool = OVERWRITE,
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """AdaMerging (Yang et al., ICLR 2024): learn merging coefficients by minimising the prediction entropy on
    unlabelled inputs, and write them as a task_arithmetic recipe."""
    import yaml

    from mergelab.checkpoint.output import write_file_atomic
    from mergelab.search.adamerging.hf import adamerging_folders

    with user_errors():
        tasks = _data(data, len(models))
        inputs = [base, *models, *tasks.values()]
        check_outputs([(out_file, "file", "--out recipe"), (json_out, "file", "--json file")], inputs, overwrite)
        result = adamerging_folders(base, models, tasks, model=model, head=head, tokenizer=tokenizer,
                                    batch_size=batch_size, max_length=max_length, max_examples=max_examples,
                                    granularity=granularity, steps=steps, lr=lr, init=init, clamp=clamp, seed=seed,
                                    device=device, show_progress=not quiet)
        recipe = result.recipe(str(base), [str(m) for m in models])
        write_file_atomic(out_file, yaml.safe_dump(recipe, sort_keys=False), inputs=inputs, overwrite=overwrite,
                          what="--out recipe")
        if json_out is not None:
            write_json(json_out, result.to_dict(), inputs=inputs, overwrite=overwrite)
    shown = ", ".join(f"{t}: {float(v):.4f}" for t, v in zip(result.tasks, result.lambdas.reshape(len(models), -1)
                                                            .mean(1)))
    out.print(f"[green]adamerging[/] ({granularity}-wise, {steps} steps): entropy {result.losses[0]:.4f} -> "
              f"{result.losses[-1]:.4f}; {'mean ' if granularity == 'layer' else ''}coefficients {shown}; "
              f"recipe written to {out_file}; merge it with `mergelab merge {out_file} OUT_DIR`",
              soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `adamerging` to the mergelab command."""
    app.command("adamerging")(adamerging_command)
