"""The Python API: merge a recipe to disk, or merge state dicts / tensors in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergelab.errors import CheckpointError, MergeError, RecipeError
from mergelab.methods.calls import merge_state_dicts, merge_tensors, methods


def merge(recipe: Any, out_dir: str | Path, *, device: str = "cpu", seed: int | None = None,
          out_shard_size: int | str = "5GB", overwrite: bool = False, dry_run: bool = False,
          show_progress: bool = False, allow_nonfinite: bool = False, allow_crimes: bool = False,
          copy_tokenizer: bool = True, write_model_card: bool = True, offline: bool | None = None):
    """Run a recipe (path, YAML text or dict) and write the merged model to `out_dir`.

    Everything is validated before the first tensor is read: the recipe, every
    input file, shapes and vocabularies, the output path and the arguments.
    Input tensors holding NaN/Inf stop the merge (NonFiniteError, nothing
    written) unless `allow_nonfinite`. Models of different architectures
    (config.json `architectures`) are refused unless `allow_crimes` (MergeKit's
    --allow-crimes). `copy_tokenizer` / `write_model_card` (MergeKit's flags of
    those names) control the tokenizer files and the README model card of the
    output. Models named by Hub id (`org/name[@revision]`) come from the local Hugging Face
    cache, else are downloaded unless `offline` (None: as HF_HUB_OFFLINE says). Returns the
    run report (or the plan when dry_run=True).
    """
    options = dict(allow_crimes=allow_crimes, copy_tokenizer=copy_tokenizer, write_model_card=write_model_card)
    from mergelab.checkpoint.output import check_output
    from mergelab.checkpoint.writer import parse_size
    from mergelab.device import resolve_device
    from mergelab.recipe import load_recipe, resolve

    shard_size = parse_size(out_shard_size)
    resolve_device(device)
    resolved = resolve(load_recipe(recipe), offline=offline)
    rec = resolved.recipe
    if rec.adapter is not None:  # inputs are LoRA adapters, the output is one too (mergelab.lora)
        from mergelab.lora.api import merge_adapter_recipe

        return merge_adapter_recipe(rec, out_dir, seed=seed, overwrite=overwrite, dry_run=dry_run)
    if rec.align is not None and not dry_run:  # models trained apart: align them first (mergelab.align)
        from mergelab.align.recipe_step import aligned_recipe_inputs

        originals = [Path(p) for p in rec.input_paths()]
        check_output(out_dir, kind="folder", inputs=originals, overwrite=overwrite, what="output folder")
        with aligned_recipe_inputs(rec, out_dir) as aligned:
            return _merge_recipe(resolve(aligned), out_dir, device=device, seed=seed, shard_size=shard_size,
                                 overwrite=overwrite, dry_run=False, show_progress=show_progress,
                                 allow_nonfinite=allow_nonfinite, protected=originals, **options)
    return _merge_recipe(resolved, out_dir, device=device, seed=seed, shard_size=shard_size, overwrite=overwrite,
                         dry_run=dry_run, show_progress=show_progress, allow_nonfinite=allow_nonfinite, **options)


def adamerging(base: Any, models: Any, data: Any, **settings: Any):
    """AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation on
    unlabelled inputs; returns an AdaMergingResult (lambdas, loss curve, .recipe(base_path, model_paths)).

    `base` an nn.Module, `models` modules or state dicts, `data` per task a list of input batches; or
    `base` a Hugging Face folder, `models` folders and `data` task -> text / .safetensors file. Settings:
    see mergelab.search.adamerging.adamerging (granularity, steps, lr, init, clamp, seed, head, ...) and
    mergelab.search.adamerging.hf.adamerging_folders (tokenizer, batch_size, max_length, max_examples).
    """
    if isinstance(base, (str, Path)):
        from mergelab.search.adamerging.hf import adamerging_folders

        return adamerging_folders(base, models, data, **settings)
    from mergelab.search.adamerging.train import adamerging as learn

    return learn(base, models, data, **settings)


def check_architectures(rec, checkpoints) -> None:
    """MergeError if the recipe's models declare different architectures in their config.json (MergeKit's check)."""
    seen: dict[str, list[str]] = {}
    for path in rec.input_paths():
        ck = checkpoints.get(path)
        config = getattr(ck, "config", None) or {}
        archs = config.get("architectures") if isinstance(config, dict) else None
        if isinstance(archs, list) and archs and isinstance(archs[0], str):
            seen.setdefault(archs[0], []).append(path)
    if len(seen) > 1:
        listed = "; ".join(f"{arch}: {', '.join(paths)}" for arch, paths in seen.items())
        raise MergeError(f"the models are of different architectures ({listed}); merging them is rarely meaningful. "
                         "Check the model paths, or merge anyway with allow_crimes=True", option="allow_crimes")


def _merge_recipe(resolved, out_dir, *, device, seed, shard_size, overwrite, dry_run, show_progress,
                  allow_nonfinite, protected=(), allow_crimes=False, copy_tokenizer=True, write_model_card=True):
    """Open the resolved inputs of a validated recipe (mergelab.recipe.resolve), plan, and run (or return
    the plan for a dry run)."""
    from mergelab.card import output_files
    from mergelab.checkpoint.reader import Checkpoint
    from mergelab.engine import execute
    from mergelab.lora.applied import open_input
    from mergelab.planner import make_plan

    rec = resolved.recipe
    checkpoints: dict[str, Checkpoint] = {}
    problems = []
    for path, inp in resolved.inputs.items():
        try:
            checkpoints[path] = open_input(inp)  # model+lora and adapters over base_model
        except CheckpointError as exc:
            problems.append(str(exc))
    if problems:
        raise CheckpointError("\n".join(problems))
    if not allow_crimes:
        check_architectures(rec, checkpoints)
    plan = make_plan(rec, checkpoints)
    if dry_run:
        return plan
    if seed is None:
        seed = rec.seed
    return execute(plan, out_dir, device=device, seed=seed, shard_size=shard_size,
                   overwrite=overwrite, show_progress=show_progress, allow_nonfinite=allow_nonfinite,
                   copy_tokenizer=copy_tokenizer, protected=protected,
                   extra_files_fn=lambda report: output_files(rec, plan, report, seed, model_card_file=write_model_card))


def task_model(merged_dir: str | Path, task: str | int, *, base: str | Path | None = None, device: str = "cpu"):
    """Task `task`'s model (its name, path or index) rebuilt from a tall_masks or emr merge's output folder
    and its side files: a state dict. `base`: the merge's base model (default: the path it recorded)."""
    from mergelab.task_models import task_model as rebuild

    return rebuild(merged_dir, task, base=base, device=device)


__all__ = ["merge", "merge_state_dicts", "merge_tensors", "methods", "task_model", "MergeError", "RecipeError"]
