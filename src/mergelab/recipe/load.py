"""Reading a recipe: a .yml/.yaml file, YAML text or a dict, to a validated Recipe.

`load_recipe` parses the source (size, depth and NaN limits first), rewrites
MergeKit's single `modules: {default: ...}` as top-level fields, validates the
schema, resolves relative model paths against the current folder and then the
recipe's folder, and runs every check of mergelab.recipe.checks, raising one
RecipeError listing every problem. It reads no checkpoint and neither looks up
nor downloads Hub models: `mergelab.recipe.resolve` does that, before planning.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mergelab.errors import RecipeError
from mergelab.methods import REGISTRY
from mergelab.recipe.checks import recipe_problems
from mergelab.recipe.model import ModelEntry, Recipe, SliceEntry, SourceEntry
from mergelab.recipe.params import suggest
from mergelab.recipe.references import local_path, references
from mergelab.tokenizer.config import TokenizerEntry

__all__ = ["load_recipe", "field_path", "MAX_RECIPE_BYTES", "MAX_RECIPE_VALUES", "MAX_RECIPE_DEPTH"]


def load_recipe(source: str | Path | Mapping, *, check_paths: bool = True) -> Recipe:
    """Read and validate a recipe: a .yml/.yaml path, YAML text, or a dict.

    Model references resolve to local paths (relative ones against the current
    folder, then the recipe's); Hub ids (`org/name[@revision]`) stay as written
    until `mergelab.recipe.resolve` finds them.

    Args:
        check_paths: check that every model path exists (False: dry validation, tests).

    Raises:
        RecipeError: listing every problem found, each with its field path and what to do.
    """
    data, name, folder = _read_source(source)
    has_modules = "modules" in data  # reported on its own; no need to add "no models" to that
    problems: list[str] = _lift_default_module(data)
    recipe = _validate_schema(data, problems)
    if recipe is None:
        raise RecipeError(problems, name)
    recipe = recipe.located({ref: local_path(ref, folder) for _, ref in references(recipe)}, name)
    problems += recipe_problems(recipe, has_modules=has_modules, check_paths=check_paths)
    if problems:
        raise RecipeError(problems, name)
    return recipe


MAX_RECIPE_BYTES = 1024 * 1024
MAX_RECIPE_VALUES = 100_000  # scalars and containers, counted with YAML aliases expanded
MAX_RECIPE_DEPTH = 32
_NUMERIC_KEYS = {"weight", "density", "t", "lambda", "epsilon", "gamma", "alpha", "beta", "select_topk", "k",
                 "filter_wise", "normalize", "rescale", "int8_mask", "eps", "scale", "filter_value"}


def _check_size(data: Any, name: str) -> None:
    """Refuse a recipe with too many values (counted with aliases expanded) or nested too deeply."""
    count = 0
    stack = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_RECIPE_VALUES:
            raise RecipeError(f"the recipe holds more than {MAX_RECIPE_VALUES} values (YAML anchors and aliases "
                              "count once per use); real recipes are far smaller; check the file", name)
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"the recipe is nested more than {MAX_RECIPE_DEPTH} levels deep; check the file", name)
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
            stack.extend((k, depth + 1) for k in item.keys() if isinstance(k, (list, dict, tuple)))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)


def _nonfinite_problems(data: Any, loc: tuple = (), key: str | None = None) -> list[str]:
    """Field paths holding NaN or Inf (as numbers, or as strings where a number belongs)."""
    out: list[str] = []
    if isinstance(data, float) and not math.isfinite(data):
        out.append(f"{field_path(loc)}: {data} is not a finite number; give a real value")
    elif isinstance(data, str) and key in _NUMERIC_KEYS:
        try:
            value = float(data)
        except ValueError:
            value = 0.0
        if not math.isfinite(value):
            out.append(f"{field_path(loc)}: {data!r} is not a finite number; give a real value")
    elif isinstance(data, Mapping):
        for k, v in data.items():
            out += _nonfinite_problems(v, (*loc, k), k if k != "value" else key)
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            out += _nonfinite_problems(v, (*loc, i), key)
    return out


def _read_source(source: str | Path | Mapping) -> tuple[dict, str, Path | None]:
    if isinstance(source, Mapping):
        _check_size(source, "<recipe>")
        return copy.deepcopy(dict(source)), "<recipe>", None
    text = str(source)
    looks_like_path = "\n" not in text and len(text) < 4096 and (
        text.endswith((".yml", ".yaml")) or Path(text).is_file())
    if isinstance(source, Path) or looks_like_path:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; check the path")
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe file {path} is {size / 1e6:.1f} MB; recipes are at most "
                              f"{MAX_RECIPE_BYTES // 1024} KB (is this the right file?)")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                              "save it as UTF-8") from None
        except OSError as exc:
            raise RecipeError(f"recipe file {path} cannot be read ({exc.strerror or exc})") from None
        name, folder = path.name, path.parent
    else:
        name, folder = "<recipe>", None
        if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
            raise RecipeError(f"the recipe text is over {MAX_RECIPE_BYTES // 1024} KB; recipes are far smaller")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {_short(str(exc))}", name) from None
    except RecursionError:
        raise RecipeError(f"the recipe is nested too deeply to be real; check the file", name) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping of fields with at least `merge_method` and `models`", name)
    _check_size(data, name)
    problems = _nonfinite_problems(data)
    if problems:
        raise RecipeError(problems, name)
    return data, name, folder


def _lift_default_module(data: dict) -> list[str]:
    """MergeKit's `modules: {default: {models|slices, parameters}}`, the one module of every single-module
    architecture, rewritten in place as top-level `models:`/`slices:`; other `modules:` stay and are refused.

    The module's `parameters:` rank between the slice's and the top-level ones (MergeKit's
    ConfigReader.parameter_sources); merged into the top level they keep that order: a module
    setting that always resolves replaces the top-level one, a list of conditions is tried first
    and falls back to the top-level setting (what MergeKit does when none of its filters match).
    """
    modules = data.get("modules")
    if not (isinstance(modules, dict) and list(modules) == ["default"] and isinstance(modules["default"], dict)):
        return []
    module = modules["default"]
    if data.get("models") or data.get("slices"):
        del data["modules"]
        return ["modules is given with top-level `models:`/`slices:`; give exactly one of models, slices or "
                "modules (as MergeKit requires)"]
    unknown = [k for k in module if k not in ("models", "slices", "parameters")]
    if unknown or bool(module.get("models")) == bool(module.get("slices")):
        del data["modules"]
        return [f"modules.default: a module holds either `models:` or `slices:` (and optionally `parameters:`); "
                f"it has {', '.join(map(str, module)) or 'nothing'}"]
    del data["modules"]
    for key in ("models", "slices"):
        if module.get(key):
            data[key] = module[key]
    top = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    own = module.get("parameters") if isinstance(module.get("parameters"), dict) else {}
    if own:
        data["parameters"] = {**top, **{k: _fall_back(v, top.get(k)) for k, v in own.items()}}
    return []


def _fall_back(setting: Any, lower: Any) -> Any:
    """`setting` evaluated first, then `lower` where `setting`'s conditions match nothing."""
    conds = [setting] if isinstance(setting, Mapping) else setting
    if lower is None or not (isinstance(conds, list) and conds and all(isinstance(c, Mapping) for c in conds)):
        return setting  # a scalar or a gradient always resolves
    rest = [lower] if isinstance(lower, Mapping) else lower
    if isinstance(rest, list) and rest and all(isinstance(c, Mapping) for c in rest):
        return [*conds, *rest]
    return [*conds, {"value": lower}]


def _short(text: str, limit: int = 300) -> str:
    """A value echoed in a message, cut to `limit` characters."""
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


# Nested models by field name, to suggest the right spelling of an unknown key.
_OWNERS: dict[str, type[BaseModel]] = {"models": ModelEntry, "slices": SliceEntry, "sources": SourceEntry,
                                       "tokenizer": TokenizerEntry}
_PRUNABLE = {"parameters", "stats", "residual_weight", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
             "chat_template", "name", "vocab_mismatch", "seed", "adapter"}


def _validate_schema(data: dict, problems: list[str]) -> Recipe | None:
    """Recipe from `data`; unknown or invalid optional keys are reported and dropped so that
    the deeper checks still run and every problem is reported together."""
    for _ in range(3):
        try:
            return Recipe.model_validate(data)
        except ValidationError as exc:
            pruned = False
            for err in exc.errors():
                msg = _schema_message(err)
                if msg not in problems:  # what pruning did not fix is raised again on the next try
                    problems.append(msg)
                pruned |= _prune(data, err["loc"], err["type"] == "extra_forbidden")
            if not pruned:
                return None
    return None


def _prune(data: Any, loc: tuple, extra: bool) -> bool:
    *parents, last = loc
    if not (extra or last in _PRUNABLE):
        return False
    for p in parents:
        try:
            data = data[p]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(data, dict) and last in data:
        del data[last]
        return True
    return False


def field_path(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


def _schema_message(err: dict) -> str:
    loc, kind = err["loc"], err["type"]
    path = field_path(loc)
    key = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden":
        if loc == ("modules",):
            names = ", ".join(map(str, err.get("input") or {})) if isinstance(err.get("input"), dict) else ""
            return (f"modules: this recipe merges the modules {names} of a multi-module model (MergeKit's "
                    "definitions of vision-language and encoder-decoder architectures say which tensors each "
                    "module holds); mergelab has no such definitions and merges single-module models only. "
                    "Merge it with mergekit, or for a single-module model write `modules: {default: ...}` "
                    "or the module's `models:`/`slices:` at the top level")
        owner = next((_OWNERS[p] for p in reversed(loc[:-1]) if isinstance(p, str) and p in _OWNERS), Recipe)
        names = [f.alias or n for n, f in owner.model_fields.items()]
        if any(key in spec.parameter_names() for spec in REGISTRY.values()):
            return f"{path}: method parameters such as {key} go under `parameters:` (e.g. parameters: {{{key}: ...}})"
        return f"{path} is not a recipe field{suggest(key, names)}. Fields here: {', '.join(names)}."
    if kind == "missing":
        hints = {"merge_method": "add `merge_method: NAME` (`mergelab methods` lists them)",
                 "model": "each entry needs `model: PATH`",
                 "layer_range": "give the source's layers as [start, end)",
                 "sources": "a slice needs `sources:`, a list of {model, layer_range}"}
        return f"{path} is missing; {hints.get(key, 'add it')}"
    if len(loc) == 2 and loc[0] == "models" and isinstance(err.get("input"), str):
        return f"{path}: {_short(repr(err['input']))} is not a model entry; write `- model: {_short(err['input'])}`"
    if loc and loc[-1] == "vocab_mismatch":
        return f"vocab_mismatch: {_short(repr(err.get('input')))} is not valid; use `error` or `resize`"
    return f"{path}: {_short(repr(err.get('input')))} is not valid: {err['msg']}"

