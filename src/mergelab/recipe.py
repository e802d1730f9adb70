"""YAML recipes in MergeKit's format, validated completely before any tensor is read.

    merge_method: ties
    base_model: ./base
    models:
      - model: ./ft-a
        parameters: {weight: 0.5, density: [1.0, 0.5]}      # a gradient over layers
    parameters:
      normalize: true
    dtype: bfloat16

`load_recipe` reads a file, YAML text or a dict, checks every field, method
parameter, value and model path, and raises one RecipeError listing every
problem. `Recipe.parameters_for` resolves a tensor's parameter settings the
way MergeKit does (global, then slice, then model; gradients and filters are
in recipe_params.py). docs/recipes.md describes the format.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from mergelab.checkpoint.hub import parse_hub_reference, resolve_hub_model
from mergelab.checkpoint.reader import parse_dtype
from mergelab.errors import CheckpointError, RecipeError
from mergelab.checkpoint.peft import is_adapter_folder as is_peft_adapter
from mergelab.lora.peft_format import split_lora_reference
from mergelab.methods import REGISTRY, MethodSpec
from mergelab.mergekit_names import not_implemented_hint
from mergelab.recipe_params import (Setting, evaluate_setting, ignored_parameters, method_fields,
                                    recipe_parameter_problems, suggest)
from mergelab.tokenizer.config import TokenizerEntry, token_source_models

__all__ = ["Recipe", "OutputSlice", "Source", "load_recipe", "evaluate_setting"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, Setting] | None = None
    stats: str | None = None  # mergelab: statistics checkpoint, for methods that need one


class SourceEntry(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] | None = None
    stats: str | None = None


class SliceEntry(_Strict):
    sources: list[SourceEntry]
    parameters: dict[str, Setting] | None = None
    base_model: str | None = None
    residual_weight: float | None = None  # accepted as MergeKit 0.1.5 does; it has no effect there either


class AdapterEntry(_Strict):
    """mergelab: write a PEFT adapter instead of a model (inputs are LoRA adapters; see mergelab.lora)."""

    rank: int | None = Field(None, ge=1)  # best rank-R approximation of the merged update
    combine: Literal["svd", "cat"] = "svd"  # cat: exact concatenation (linear-type merges)
    align: Literal["knots"] | None = None  # knots: merge in the adapters' shared SVD basis


@dataclasses.dataclass(frozen=True)
class Source:
    """One input of an output slice: a resolved model path and its own parameter settings."""

    model: str
    layer_range: tuple[int, int] | None  # [start, end) of its layers; None: all of them
    parameters: dict[str, Setting]
    stats: str | None = None


@dataclasses.dataclass(frozen=True)
class OutputSlice:
    """A run of output layers merged from the same sources (the whole model without `slices`)."""

    sources: list[Source]
    parameters: dict[str, Setting]
    base_model: str | None  # the slice's own base model (resolved), else the recipe's applies


class Recipe(_Strict):
    """A validated recipe; build it with `load_recipe`. Fields are MergeKit's, as written."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[SliceEntry] | None = None
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype_name: str | None = Field(None, alias="out_dtype")
    tokenizer_source: str | None = None
    tokenizer: TokenizerEntry | None = None
    chat_template: str | None = None
    name: str | None = None
    vocab_mismatch: Literal["error", "resize"] = "error"  # mergelab
    seed: int | None = None  # mergelab
    base_stats: str | None = None  # mergelab: the base model's statistics, for methods that use them
    adapter: AdapterEntry | None = None  # mergelab: LoRA adapter output
    align: Literal["weight_matching"] | None = None  # mergelab: permute models into the reference's basis first

    _source_name: str = PrivateAttr("<recipe>")
    _paths: dict[str, str] = PrivateAttr(default_factory=dict)  # model reference -> resolved path

    @property
    def source_name(self) -> str:
        return self._source_name

    @property
    def method(self) -> MethodSpec:
        return REGISTRY[self.merge_method]

    def resolve(self, ref: str) -> str:
        """The path a model reference resolved to when the recipe was loaded."""
        return self._paths.get(ref) or os.path.normpath(os.path.expanduser(ref))

    @property
    def base(self) -> str | None:
        return self.resolve(self.base_model) if self.base_model else None

    def output_slices(self) -> list[OutputSlice]:
        """The recipe as output slices, normalised like MergeKit's normalize_config."""
        if self.slices:
            return [OutputSlice([Source(self.resolve(s.model), tuple(s.layer_range), dict(s.parameters or {}),
                                        self.resolve(s.stats) if s.stats else None) for s in sl.sources],
                                dict(sl.parameters or {}), self.resolve(sl.base_model) if sl.base_model else None)
                    for sl in self.slices]
        sources = [Source(self.resolve(m.model), None, dict(m.parameters or {}),
                          self.resolve(m.stats) if m.stats else None) for m in self.models or []]
        # As MergeKit's normalize_config: a base not among the models is added as one more input. Methods
        # that use a base take it apart; for base-free ones (linear, karcher) it is merged like the others.
        if self.base and self.base not in [s.model for s in sources] and (
                self.method.base != "ignored" or self.base_is_extra_model()):
            sources.append(Source(self.base, None, {}))
        return [OutputSlice(sources, {}, None)]

    def base_is_extra_model(self) -> bool:
        """base_model is merged as one more model: a base-free method, as MergeKit does, except with
        statistics methods (the base has no statistics) and adapter merges (there it is the adapters' base)."""
        if not self.base or self.slices or self.method.base != "ignored" or self.method.needs_stats:
            return False
        models = [self.resolve(m.model) for m in self.models or []]
        return self.base not in models and not any(is_peft_adapter(m) for m in models)

    def input_paths(self) -> list[str]:
        """Every distinct model path the merge reads: the base first, then in order of appearance."""
        out = [self.base] if self.base else []
        for sl in self.output_slices():
            for path in [s.model for s in sl.sources] + [sl.base_model]:
                if path and path not in out:
                    out.append(path)
        tok = self.tokenizer_source_path()
        if tok and tok not in out:
            out.append(tok)
        return out

    def tokenizer_source_path(self) -> str | None:
        """Where config and tokenizer files come from, if the recipe says (None: the engine decides)."""
        src = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        if src is None:
            return None
        return self.base if src in ("base", "union") else self.resolve(src)

    def parameters_for(self, tensor_name: str, t: float, model: str | None,
                       out_slice: OutputSlice | None = None) -> dict[str, Any]:
        """The parameter settings that apply to one tensor, each evaluated at (tensor_name, t).

        Levels, later ones overriding earlier ones: the global `parameters`, the
        slice's `parameters`, then (if `model` is given) that model's or slice
        source's own. A level whose setting resolves to nothing (a filter list
        with no match) leaves the earlier level's value. MergeKit matches the
        filters of per-model parameters against the input tensor's name and of
        shared ones against the output tensor's name; pass the name accordingly.

        Args:
            tensor_name: the tensor's name, matched against filters.
            t: the layer's position in its slice, i / (L - 1) (1 if L == 1), 0 outside layers.
            model: a resolved model path (as in `Source.model`), or None for shared parameters.
            out_slice: the output slice the tensor belongs to; None: the model's entry anywhere.

        Returns:
            {name as the recipe spells it: value}, only names that resolved to a value.
        """
        levels: list[Mapping[str, Setting]] = [self.parameters or {}]
        slices = [out_slice] if out_slice is not None else self.output_slices()
        if out_slice is not None:
            levels.append(out_slice.parameters)
        if model is not None:
            own = [s.parameters for sl in slices for s in sl.sources if s.model == model]
            levels += own[:1]
        fields = method_fields(self.method)
        out: dict[str, Any] = {}
        for level in levels:
            for key, setting in level.items():
                convert = fields[key].convert if key in fields else None
                value = evaluate_setting(setting, tensor_name, t, convert)
                if value is not None:
                    out[key] = value
        return out

    @property
    def compute_dtype(self) -> torch.dtype:
        # 16-bit `dtype`s still compute in float32: one rounding at the end instead of one per
        # operation, on CPUs that lack fast bf16 anyway. float64 is honoured.
        return torch.float64 if self.dtype and parse_dtype(self.dtype) == torch.float64 else torch.float32

    @property
    def out_dtype(self) -> torch.dtype | None:
        """`out_dtype`, else `dtype`, else None: keep the inputs' dtype."""
        text = self.out_dtype_name or self.dtype
        return parse_dtype(text) if text else None

    def ignored_parameters(self) -> list[str]:
        """Settings the method does not use, accepted as MergeKit accepts them (see recipe_params)."""
        return ignored_parameters(self)

    def to_yaml(self) -> str:
        """The recipe as given (fields as written, model references unresolved), for the output's copy."""
        data = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return yaml.safe_dump(data, sort_keys=False)


# -- loading ----------------------------------------------------------------------------------


def load_recipe(source: str | Path | Mapping, *, check_paths: bool = True, offline: bool | None = None) -> Recipe:
    """Read and validate a recipe: a .yml/.yaml path, YAML text, or a dict.

    Args:
        check_paths: check that every model path exists (False: dry validation, tests; Hub ids
            are then left unresolved).
        offline: resolve Hub ids (`org/name[@revision]`) from the local cache only; None: as
            HF_HUB_OFFLINE says (see mergelab.checkpoint.hub).

    Raises:
        RecipeError: listing every problem found, each with its field path and what to do.
    """
    data, name, folder = _read_source(source)
    has_modules = "modules" in data  # reported on its own; no need to add "no models" to that
    problems: list[str] = _lift_default_module(data)
    recipe = _validate_schema(data, problems)
    if recipe is None:
        raise RecipeError(problems, name)
    recipe._source_name = name
    recipe._paths = {ref: _resolve(ref, folder) for _, ref in _references(recipe)}
    if check_paths:  # Hub ids already in the local cache (no network), so the checks below see their folders
        _resolve_hub_models(recipe, offline=True, report=False)
    problems += _structure_problems(recipe, has_modules)
    if recipe.merge_method not in REGISTRY:
        hint = not_implemented_hint(recipe.merge_method, REGISTRY)
        problems.append(f"merge_method: {hint}" if hint else f"merge_method: unknown method {recipe.merge_method!r}"
                        f"{suggest(recipe.merge_method, REGISTRY)}; `mergelab methods` lists them")
    else:
        problems += _method_problems(recipe) + recipe_parameter_problems(recipe)
    problems += _path_problems(recipe, check_paths)
    if check_paths and not problems:  # download only for a recipe that is otherwise right
        problems += _resolve_hub_models(recipe, offline=offline, report=True)
    if problems:
        raise RecipeError(problems, name)
    return recipe


# Limits on what a recipe can be. Real recipes are a few KB with a few hundred values; these
# bounds refuse at once what would otherwise hang (YAML alias bombs, megabyte lists) or recurse.
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


# -- checks beyond the schema -------------------------------------------------------------------


def _references(r: Recipe) -> list[tuple[str, str]]:
    """(field path, model reference as written) for every path the recipe names."""
    refs = [("base_model", r.base_model)] if r.base_model else []
    refs += [("base_stats", r.base_stats)] if r.base_stats else []
    for i, m in enumerate(r.models or []):
        refs += [(f"models[{i}].model", m.model)] + ([(f"models[{i}].stats", m.stats)] if m.stats else [])
    for i, sl in enumerate(r.slices or []):
        refs += [(f"slices[{i}].base_model", sl.base_model)] if sl.base_model else []
        for j, s in enumerate(sl.sources):
            where = f"slices[{i}].sources[{j}]"
            refs += [(f"{where}.model", s.model)] + ([(f"{where}.stats", s.stats)] if s.stats else [])
    tok, where = (r.tokenizer.source, "tokenizer.source") if r.tokenizer else (r.tokenizer_source, "tokenizer_source")
    if tok and tok not in ("base", "union"):
        refs.append((where, tok))
    return refs + token_source_models(r.tokenizer)


def _resolve(ref: str, folder: Path | None) -> str:
    # The current folder first, then the recipe's folder; what exists nowhere stays as written.
    p = Path(ref).expanduser()
    lora = split_lora_reference(ref)
    if lora is not None and not p.exists():  # MergeKit's model+lora: each part resolves on its own
        return "+".join(_resolve(part, folder) for part in lora)
    if p.is_absolute():
        return os.path.normpath(p)
    if p.exists():
        return os.path.abspath(p)
    if folder is not None and (folder / p).exists():
        return os.path.abspath(folder / p)
    return os.path.normpath(p)


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
    for where, ref in _references(r):
        path = r.resolve(ref)
        if path in seen or Path(path).exists():
            continue
        seen.add(path)
        lora = split_lora_reference(path)
        if lora is not None:
            missing = [f"{what} '{part}'" for what, part in zip(("the model", "the adapter"), lora)
                       if not Path(part).exists() and parse_hub_reference(part) is None]  # Hub ids: see above
            if missing:
                out.append(f"{where}: '{ref}' (model+lora): {' and '.join(missing)} not found")
            if Path(lora[1]).exists() and not is_peft_adapter(lora[1]):
                out.append(f"{where}: '{lora[1]}' after '+' is not a PEFT adapter folder (no adapter_config.json)")
        elif not check_paths or parse_hub_reference(ref) is not None:
            continue  # a Hub id is resolved, and its problem reported, once everything else is right
        else:
            out.append(f"{where}: '{ref}' does not exist; relative paths resolve against the current "
                       "folder, then the recipe's folder")
    return out


def _resolve_hub_models(r: Recipe, *, offline: bool | None, report: bool) -> list[str]:
    """Resolve every reference that is no local path but a Hub id (also either side of model+lora)
    to its folder in the Hub cache, downloading it unless offline; one problem per failed id
    (none if not `report`)."""
    out: list[str] = []
    failed: set[str] = set()
    for where, ref in _references(r):
        path = r._paths[ref]
        if Path(path).exists():
            continue  # a local path that exists always wins over a Hub id
        raw = split_lora_reference(ref) or (ref,)
        resolved = list(split_lora_reference(path) or (path,))
        if len(raw) != len(resolved):
            continue
        for i, part in enumerate(raw):
            if Path(resolved[i]).exists() or part in failed or parse_hub_reference(part) is None:
                continue
            try:
                resolved[i] = resolve_hub_model(part, offline=offline)
            except CheckpointError as exc:
                failed.add(part)
                if report:
                    out.append(f"{where}: {exc}")
        r._paths[ref] = "+".join(resolved)
    return out
