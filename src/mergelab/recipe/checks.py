"""Checks of a parsed recipe beyond its schema: structure, method, parameters, tokenizer, dtypes, paths.

`recipe_problems` runs them all and returns every problem, each naming its field;
`load_recipe` raises them together as one RecipeError, and `resolve` runs them
again once Hub ids point at their folders.
"""

from __future__ import annotations

from pathlib import Path

from mergelab.checkpoint.hub import parse_hub_reference
from mergelab.checkpoint.peft import is_adapter_folder
from mergelab.checkpoint.reader import parse_dtype
from mergelab.methods import REGISTRY
from mergelab.mergekit_names import not_implemented_hint
from mergelab.recipe.model import Recipe
from mergelab.recipe.params import method_fields, recipe_parameter_problems, suggest
from mergelab.recipe.references import references, split_lora_reference

__all__ = ["recipe_problems"]


def recipe_problems(r: Recipe, *, has_modules: bool = False, check_paths: bool = True) -> list[str]:
    """Every problem of a recipe that passed its schema, in the order they are reported.

    Args:
        has_modules: the recipe had a `modules:` key (reported on its own: no "no models" then).
        check_paths: also report model paths that do not exist (Hub ids are left to `resolve`).
    """
    problems = _structure_problems(r, has_modules)
    if r.merge_method not in REGISTRY:
        hint = not_implemented_hint(r.merge_method, REGISTRY)
        problems.append(f"merge_method: {hint}" if hint else f"merge_method: unknown method {r.merge_method!r}"
                        f"{suggest(r.merge_method, REGISTRY)}; `mergelab methods` lists them")
    else:
        problems += _method_problems(r) + recipe_parameter_problems(r)
    return problems + _path_problems(r, check_paths)


def _structure_problems(r: Recipe, has_modules: bool) -> list[str]:
    out = []
    if r.models and r.slices:
        out.append("models and slices are both given; use `models:` to merge whole models or `slices:` "
                   "to merge layer ranges, not both")
    elif not r.models and not r.slices and not has_modules:
        out.append("models: no models to merge; list them under `models:` (or layer ranges under `slices:`)")
    for i, sl in enumerate(r.slices or []):
        if not sl.sources:
            out.append(f"slices[{i}].sources is empty; list the models and layer ranges this slice takes")
        for j, s in enumerate(sl.sources):
            a, b = s.layer_range
            if not 0 <= a < b:
                out.append(f"slices[{i}].sources[{j}].layer_range: [{a}, {b}] is not a layer range; "
                           "it is [start, end) with 0 <= start < end")
        lengths = [s.layer_range[1] - s.layer_range[0] for s in sl.sources]
        if len(set(lengths)) > 1:
            out.append(f"slices[{i}]: its sources span {lengths} layers; every source of a slice must "
                       "span the same number of layers")
    groups = [("models", [m.model for m in r.models or []], "models[{}].model")]
    groups += [(f"slices[{i}]", [s.model for s in sl.sources], f"slices[{i}].sources[{{}}].model")
               for i, sl in enumerate(r.slices or [])]
    for _, refs, pattern in groups:
        first: dict[str, int] = {}
        for j, ref in enumerate(refs):
            k = first.setdefault(r.resolve(ref), j)
            if k != j:
                out.append(f"{pattern.format(j)}: '{ref}' is already {pattern.format(k)}; "
                           "list each model once per merge (MergeKit refuses duplicates too)")
    return out + _tokenizer_problems(r) + _dtype_problems(r)


def _tokenizer_problems(r: Recipe) -> list[str]:
    out = []
    if r.tokenizer is not None and r.tokenizer_source is not None:
        out.append("tokenizer_source and tokenizer are both given; keep one (`tokenizer: {source: ...}` "
                   "or `tokenizer_source: ...`)")
    where, src = ("tokenizer.source", r.tokenizer.source) if r.tokenizer else ("tokenizer_source", r.tokenizer_source)
    if src == "base" and not r.base_model:
        out.append(f"{where}: base needs a `base_model:`; add one or give a model path")
    return out


def _dtype_problems(r: Recipe) -> list[str]:
    out = []
    for key, text in (("dtype", r.dtype), ("out_dtype", r.out_dtype_name)):
        if text is not None:
            try:
                parse_dtype(text)
            except ValueError as exc:
                out.append(f"{key}: {exc}")
    return out


def _method_problems(r: Recipe) -> list[str]:
    spec, out = r.method, []
    uses_base = spec.base != "ignored"
    if r.slices:
        for i, sl in enumerate(r.slices):
            base = r.resolve(sl.base_model) if sl.base_model else r.base
            if spec.base == "required" and not base:
                out.append(f"slices[{i}]: {spec.name} needs a base model; add `base_model:` to the recipe "
                           "or to the slice")
            elif uses_base and base and base not in [r.resolve(s.model) for s in sl.sources]:
                out.append(f"slices[{i}]: its base model '{base}' is not among its sources; add it as a "
                           "source with the layer_range to take from it")
    elif spec.base == "required" and not r.base:
        out.append(f"base_model: {spec.name} needs a base model; add `base_model: PATH`")
    elif r.base_is_extra_model():
        out += _extra_base_problems(r)
    elif not uses_base and spec.needs_stats and r.base and r.base not in [r.resolve(m.model) for m in r.models or []]:
        out.append(f"base_model: {spec.name} uses no base model and '{r.base_model}' is not under `models:`; "
                   "MergeKit would merge it as one more model, which needs its statistics here: list it "
                   "under `models:` with its `stats:`, or remove base_model")
    for i, sl in enumerate(r.output_slices() if r.models or r.slices else []):
        base = (sl.base_model or r.base) if uses_base else None
        n = sum(1 for s in sl.sources if s.model != base)
        lo, hi = spec.min_models, spec.max_models
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if hi == lo else f"at least {lo}" + (f" and at most {hi}" if hi else "")
            besides = (" besides the base model" if uses_base else
                       " (base_model counts as one more, as in MergeKit)" if r.base_is_extra_model() else "")
            where = f"slices[{i}]" if r.slices else "models"
            out.append(f"{where}: {spec.name} merges {want} model(s){besides}; the recipe gives {n}")
    return out


def _extra_base_problems(r: Recipe) -> list[str]:
    """The base merged as one more model takes its per-model parameters from the top level only."""
    spec = r.method
    top = r.parameters or {}
    required = [pf for key, pf in method_fields(spec).items() if key == pf.name and pf.per_model
                and pf.info.is_required() and pf.name not in top and pf.attr not in top]
    return [f"base_model: {spec.name} uses no base model, so '{r.base_model}' is merged as one more model (as "
            f"MergeKit does) and needs a {pf.name}; set it under the top-level `parameters:` (every model's "
            "default), or list the base under `models:` with its own" for pf in required]


def _path_problems(r: Recipe, check_paths: bool) -> list[str]:
    out, seen = [], set()
    for where, ref in references(r):
        path = r.resolve(ref)
        if path in seen or Path(path).exists():
            continue
        seen.add(path)
        lora = split_lora_reference(path)
        if lora is not None:
            missing = [f"{what} '{part}'" for what, part in zip(("the model", "the adapter"), lora)
                       if not Path(part).exists() and parse_hub_reference(part) is None]  # Hub ids: resolve
            if missing:
                out.append(f"{where}: '{ref}' (model+lora): {' and '.join(missing)} not found")
            if Path(lora[1]).exists() and not is_adapter_folder(lora[1]):
                out.append(f"{where}: '{lora[1]}' after '+' is not a PEFT adapter folder (no adapter_config.json)")
        elif not check_paths or parse_hub_reference(ref) is not None:
            continue  # a Hub id is found, or its problem reported, by resolve (mergelab.recipe.resolve)
        else:
            out.append(f"{where}: '{ref}' does not exist; relative paths resolve against the current "
                       "folder, then the recipe's folder")
    return out

