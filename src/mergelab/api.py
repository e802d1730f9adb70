"""The Python API: merge a recipe to disk, or merge state dicts / tensors in memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from mergelab.errors import CheckpointError, MergeError, RecipeError, ShapeMismatch
from mergelab.methods import REGISTRY, MethodSpec, PerModel, get_method, run_method, spellings


def methods() -> dict[str, dict[str, Any]]:
    """Every registered method: name -> description (parameters, defaults, base, doc)."""
    return {name: spec.describe() for name, spec in sorted(REGISTRY.items())}


def _spec(method: str) -> MethodSpec:
    try:
        return get_method(method)
    except KeyError as exc:
        raise MergeError(exc.args[0]) from None


def _split_params(spec: MethodSpec, n: int, params: Mapping[str, Any]) -> tuple[list, Any]:
    """Keyword parameters -> (per-model parameter objects, shared parameter object).

    A per-model parameter is a scalar (same for every model) or a sequence of n values.
    """
    mkeys, skeys = spellings(spec.model_params), spellings(spec.shared_params)
    unknown = [k for k in params if k not in mkeys and k not in skeys]
    if unknown:
        raise MergeError(f"{unknown[0]!r} is not a parameter of {spec.name}; "
                         f"its parameters are: {', '.join(spec.parameter_names()) or 'none'}")

    per_model: list[dict] = [{} for _ in range(n)]
    shared: dict = {}
    for k, v in params.items():
        if k in mkeys:
            values = list(v) if isinstance(v, (list, tuple)) else [v] * n
            if len(values) != n:
                raise MergeError(f"parameter {k!r} of {spec.name} has {len(values)} values for {n} models")
            for i, value in enumerate(values):
                per_model[i][k] = value
        else:
            shared[k] = v
    try:
        return [spec.model_params(**d) for d in per_model], spec.shared_params(**shared)
    except ValidationError as exc:
        raise MergeError(f"bad parameters for {spec.name}: {exc}") from None


def merge_tensors(method: str, tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None,
                  stats: Sequence[torch.Tensor] | None = None, seed: int | None = None,
                  name: str = "", base_stats: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
    """Merge one tensor from several models.

    Args:
        method: a registered method name (see `mergelab.methods()`).
        tensors: one tensor per model, same shape (the base excluded for methods with a base).
        base: the base model's tensor, for methods that need or accept one.
        stats: per-model metric tensors for methods that need statistics (None: the
            method's own fallback, e.g. RegMean averages a tensor that has no Gram).
        base_stats: the base model's metric, for gradient_matching's prior H_0.
        seed: seed of randomised methods (combined with `name`, as the engine does).
        **params: the method's parameters; per-model ones as a scalar or one value per model.

    Returns:
        The merged tensor in the dtype of the first input.
    """
    from mergelab.engine import make_generator

    spec = _spec(method)
    if not tensors:
        raise MergeError("merge_tensors needs at least one tensor")
    if spec.needs_base and base is None:
        raise MergeError(f"{method} needs a base tensor: pass base=")
    if spec.base == "ignored" and base is not None:
        raise MergeError(f"{method} does not use a base model; list it among the models instead")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ShapeMismatch(f"tensor {i} has shape {tuple(t.shape)}, tensor 0 has {tuple(shape)}")
    if base is not None and base.shape != shape:
        raise ShapeMismatch(f"base has shape {tuple(base.shape)}, the models have {tuple(shape)}")
    n = len(tensors)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        bound = f"{spec.min_models}" + (f"..{spec.max_models}" if spec.max_models != spec.min_models else "")
        raise MergeError(f"{method} merges {bound} models (besides the base), got {n}")
    model_params, shared = _split_params(spec, n, params)
    cdtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    kwargs = {}
    if spec.needs_stats:
        # None lets the method fall back where its paper does (RegMean averages tensors without a Gram).
        kwargs["stats"] = None if stats is None else torch.stack([s.to(cdtype) for s in stats])
        if base_stats is not None:
            kwargs["base_stats"] = base_stats.to(cdtype)
    gen = make_generator(seed, name, tensors[0].device) if spec.randomized else None
    return run_method(spec, list(tensors), base, PerModel(model_params), shared, gen, out_dtype=tensors[0].dtype,
                      compute_dtype=cdtype, **kwargs)


def _as_state_dict(m: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(m, torch.nn.Module):
        return m.state_dict()
    if isinstance(m, Mapping):
        return m
    raise MergeError(f"expected a state dict or nn.Module, got {type(m).__name__}")


def merge_state_dicts(method: str, models: Sequence[Any], *, base: Any = None,
                      stats: Sequence[Any] | None = None, seed: int | None = None,
                      base_stats: Any = None, **params: Any) -> dict[str, torch.Tensor]:
    """Merge whole models in memory (state dicts or nn.Modules); returns a new state dict.

    Every tensor of the reference (the base, else the first model) is merged
    with `method`; non-float tensors (e.g. integer buffers) are copied from the
    reference. Tensors missing from a model, or of another shape, raise
    ShapeMismatch naming the tensor.
    """
    sds = [_as_state_dict(m) for m in models]
    bsd = _as_state_dict(base) if base is not None else None
    ssd = [_as_state_dict(s) for s in stats] if stats is not None else None
    bst = _as_state_dict(base_stats) if base_stats is not None else None
    ref = bsd if bsd is not None else sds[0]
    out: dict[str, torch.Tensor] = {}
    for name, ref_t in ref.items():
        if not ref_t.is_floating_point():
            out[name] = ref_t.clone()
            continue
        missing = [i for i, sd in enumerate(sds) if name not in sd]
        if missing:
            raise ShapeMismatch(f"model {missing[0]} has no tensor {name!r}, the reference has")
        for i, sd in enumerate(sds):
            if sd[name].shape != ref_t.shape:
                raise ShapeMismatch(f"model {i} tensor {name!r} has shape {tuple(sd[name].shape)}, "
                                    f"the reference has {tuple(ref_t.shape)}")
        st = [s.get(name) for s in ssd] if ssd is not None else None
        if st is not None and any(t is None for t in st):
            have = [i for i, t in enumerate(st) if t is not None]
            if have:
                raise MergeError(f"stats of models {have} have tensor {name!r}, the others do not: "
                                 "statistics must cover the same tensors in every model")
            st = None
        out[name] = merge_tensors(method, [sd[name] for sd in sds], base=bsd[name] if bsd else None,
                                  stats=st, seed=seed, name=name,
                                  base_stats=bst.get(name) if bst is not None else None, **params)
    return out


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
    from mergelab.engine import resolve_device
    from mergelab.recipe import load_recipe

    shard_size = parse_size(out_shard_size)
    resolve_device(device)
    rec = load_recipe(recipe, offline=offline)
    if rec.adapter is not None:  # inputs are LoRA adapters, the output is one too (mergelab.lora)
        from mergelab.lora.api import merge_adapter_recipe

        return merge_adapter_recipe(rec, out_dir, seed=seed, overwrite=overwrite, dry_run=dry_run)
    if rec.align is not None and not dry_run:  # models trained apart: align them first (mergelab.align)
        from mergelab.align.recipe_step import aligned_recipe_inputs

        originals = [Path(p) for p in rec.input_paths()]
        check_output(out_dir, kind="folder", inputs=originals, overwrite=overwrite, what="output folder")
        with aligned_recipe_inputs(rec, out_dir):
            return _merge_recipe(rec, out_dir, device=device, seed=seed, shard_size=shard_size,
                                 overwrite=overwrite, dry_run=False, show_progress=show_progress,
                                 allow_nonfinite=allow_nonfinite, protected=originals, **options)
    return _merge_recipe(rec, out_dir, device=device, seed=seed, shard_size=shard_size, overwrite=overwrite,
                         dry_run=dry_run, show_progress=show_progress, allow_nonfinite=allow_nonfinite, **options)


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
                         "Check the model paths, or merge anyway with allow_crimes=True (--allow-crimes)")


def _merge_recipe(rec, out_dir, *, device, seed, shard_size, overwrite, dry_run, show_progress, allow_nonfinite,
                  protected=(), allow_crimes=False, copy_tokenizer=True, write_model_card=True):
    """Open the inputs of a validated recipe, plan, and run (or return the plan for a dry run)."""
    from mergelab.card import output_files
    from mergelab.checkpoint.reader import Checkpoint
    from mergelab.engine import execute
    from mergelab.lora.applied import open_input
    from mergelab.plan import make_plan

    checkpoints: dict[str, Checkpoint] = {}
    problems = []
    stats_paths = [src.stats for sl in rec.output_slices() for src in sl.sources if getattr(src, "stats", None)]
    if rec.base_stats:
        stats_paths.append(rec.resolve(rec.base_stats))
    for path in [*rec.input_paths(), *stats_paths]:
        if path in checkpoints:
            continue
        try:
            checkpoints[path] = open_input(path, rec.base)  # model+lora and adapters over base_model
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


__all__ = ["merge", "merge_state_dicts", "merge_tensors", "methods", "MergeError", "RecipeError"]
