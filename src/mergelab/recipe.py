"""YAML recipes in MergeKit's format, validated before any tensor is read.

    merge_method: ties
    base_model: ./base
    models:
      - model: ./ft-a
        parameters: {weight: 0.5, density: [1.0, 0.5]}      # a gradient over layers
    parameters:
      normalize: true
      t: [{filter: self_attn, value: 0.3}, {value: 0.5}]    # filters by tensor name
    dtype: float32

Parameter settings resolve per tensor exactly as MergeKit's do: global
`parameters`, then the slice's, then the model's own, later levels overriding
earlier ones. A setting is a scalar, a gradient (a list of numbers
interpolated linearly over the layer position t in [0, 1], t = i / (L - 1)
within a slice and 0 for tensors outside the layers), or a list of
{filter, value} conditions where the first whose filter is a substring of the
tensor name wins. Every problem is collected and reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from mergelab.errors import RecipeError
from mergelab.methods import REGISTRY, MethodSpec

Setting = Any  # scalar | list of scalars | list of {filter, value} | {filter, value}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputModel(_Strict):
    model: str
    parameters: dict[str, Setting] | None = None
    stats: str | None = None


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] | None = None
    stats: str | None = None


class SliceDef(_Strict):
    sources: list[InputSlice]
    parameters: dict[str, Setting] | None = None
    base_model: str | None = None


class TokenizerDef(_Strict):
    source: str | None = None


class RecipeModel(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[SliceDef] | None = None
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerDef | None = None
    chat_template: str | None = None
    name: str | None = None
    vocab_mismatch: Literal["error", "resize"] = "error"
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    model: str
    layer_range: tuple[int, int] | None
    parameters: Mapping[str, Setting]


@dataclasses.dataclass(frozen=True)
class OutputSlice:
    sources: tuple[Source, ...]
    parameters: Mapping[str, Setting]
    base_model: str | None


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """MergeKit's rule: scalars as they are, numeric gradients interpolated, first matching filter wins.

    Returns None when a filter list has no matching condition.
    """
    if isinstance(setting, Mapping) and "value" in setting:
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(_is_scalar(v) for v in setting):
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
            if not numeric:
                return setting[int(t * (len(setting) - 1))]
            pos = t * (len(setting) - 1)
            i0 = int(pos)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = pos - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            filt = cond.get("filter") if isinstance(cond, Mapping) else None
            if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t)
    return None


def _endpoints(setting: Setting) -> list[Any]:
    """Every concrete value a setting can produce (for validation)."""
    if isinstance(setting, Mapping):
        return _endpoints(setting.get("value"))
    if isinstance(setting, list):
        out = []
        for v in setting:
            out.extend(_endpoints(v))
        return out
    return [setting]


class Recipe:
    """A validated recipe with model paths resolved."""

    def __init__(self, model: RecipeModel, raw: dict, source_name: str, resolve):
        self.model = model
        self.raw = raw
        self.source_name = source_name
        self._resolve = resolve
        self.method: MethodSpec = REGISTRY[model.merge_method]
        self.base: str | None = resolve(model.base_model) if model.base_model else None
        self.slices = model.slices
        self.vocab_mismatch = model.vocab_mismatch
        self.seed = model.seed
        self.parameters = dict(model.parameters or {})

    # -- structure -----------------------------------------------------------------
    def output_slices(self) -> list[OutputSlice]:
        m = self.model
        if m.slices:
            return [OutputSlice(tuple(Source(self._resolve(s.model), tuple(s.layer_range), dict(s.parameters or {}))
                                      for s in sl.sources), dict(sl.parameters or {}),
                                self._resolve(sl.base_model) if sl.base_model else None) for sl in m.slices]
        sources = [Source(self._resolve(im.model), None, dict(im.parameters or {})) for im in m.models or []]
        if self.base is not None and self.method.base != "ignored" and self.base not in [s.model for s in sources]:
            sources.append(Source(self.base, None, {}))
        return [OutputSlice(tuple(sources), {}, None)]

    def input_paths(self) -> list[str]:
        out: list[str] = []
        if self.base is not None:
            out.append(self.base)
        for sl in self.output_slices():
            for s in sl.sources:
                if s.model not in out:
                    out.append(s.model)
            if sl.base_model and sl.base_model not in out:
                out.append(sl.base_model)
        tok = self.tokenizer_source_path()
        if tok is not None and tok not in out:
            out.append(tok)
        return out

    def tokenizer_source_path(self) -> str | None:
        src = self.model.tokenizer_source or (self.model.tokenizer.source if self.model.tokenizer else None)
        if src is None or src == "base":
            return self.base if src == "base" else None
        return self._resolve(src)

    def parameters_for(self, tensor_name: str, t: float, model: str | None,
                       out_slice: OutputSlice | None = None) -> dict[str, Any]:
        layers: list[Mapping[str, Setting]] = [self.parameters]
        if out_slice is not None:
            layers.append(out_slice.parameters)
            if model is not None:
                layers += [s.parameters for s in out_slice.sources if s.model == model][:1]
        elif model is not None:
            for sl in self.output_slices():
                layers += [s.parameters for s in sl.sources if s.model == model][:1]
        out: dict[str, Any] = {}
        for level in layers:
            for key, setting in level.items():
                value = evaluate_setting(setting, tensor_name, t)
                if value is not None:
                    out[key] = value
        return out

    @property
    def compute_dtype(self) -> torch.dtype:
        # mergelab computes in float32 even when `dtype` names a 16-bit type: one rounding at the end
        # instead of one per operation. float64 is honoured.
        return torch.float64 if self.model.dtype in ("float64", "fp64", "double") else torch.float32

    @property
    def out_dtype(self) -> torch.dtype | None:
        from mergelab.checkpoint.reader import parse_dtype

        text = self.model.out_dtype or self.model.dtype
        return parse_dtype(text) if text else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


# -- loading and validation ---------------------------------------------------------

def _read_source(source) -> tuple[dict, str, Path | None]:
    if isinstance(source, Mapping):
        return dict(source), "<recipe>", None
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                     and (source.endswith((".yml", ".yaml")) or Path(source).is_file())):
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        text, name, folder = path.read_text(), path.name, path.parent
    else:
        text, name, folder = str(source), "<recipe>", None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {exc}", name) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping with at least `merge_method`", name)
    return data, name, folder


def _path_resolver(folder: Path | None):
    def resolve(ref: str) -> str:
        p = Path(ref).expanduser()
        if p.exists() or folder is None or p.is_absolute():
            return str(p.resolve()) if p.exists() else str(p)
        alt = folder / p
        return str(alt.resolve()) if alt.exists() else str(p)
    return resolve


def _schema_problems(exc: ValidationError, data: dict) -> list[str]:
    out = []
    for err in exc.errors():
        loc = err["loc"]
        path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
        if err["type"] == "extra_forbidden":
            fields = {"": RecipeModel, "models": InputModel, "slices": SliceDef, "sources": InputSlice,
                      "tokenizer": TokenizerDef}
            owner = next((fields[str(p)] for p in reversed(loc[:-1]) if str(p) in fields), RecipeModel)
            if loc[0] == "modules":
                out.append("modules: MergeKit's multi-module syntax is not supported; use models or slices")
                continue
            out.append(f"{path} is not a recipe field{_suggest(str(loc[-1]), owner.model_fields)}")
        else:
            out.append(f"{path}: {err['msg']}")
    return out


def load_recipe(source: str | Path | Mapping, *, check_paths: bool = True) -> Recipe:
    """Read and validate a recipe (file path, YAML text or dict); raises RecipeError listing every problem."""
    data, name, folder = _read_source(source)
    try:
        model = RecipeModel.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_schema_problems(exc, data), name) from None
    problems: list[str] = []
    if model.merge_method not in REGISTRY:
        raise RecipeError(f"merge_method: unknown method {model.merge_method!r}{_suggest(model.merge_method, REGISTRY)};"
                          " run `mergelab methods` for the list", name)
    resolve = _path_resolver(folder)
    recipe = Recipe(model, data, name, resolve)
    _check_structure(recipe, problems)
    _check_parameters(recipe, problems)
    if check_paths:
        _check_paths(recipe, problems)
    if problems:
        raise RecipeError(problems, name)
    return recipe


def _check_structure(recipe: Recipe, problems: list[str]) -> None:
    m, spec = recipe.model, recipe.method
    if m.models and m.slices:
        problems.append("models and slices are both given: use one of them")
    if not m.models and not m.slices:
        problems.append("models: no models to merge; list them under `models:` (or `slices:`)")
        return
    if spec.needs_base and not m.base_model and not (m.slices and all(s.base_model for s in m.slices)):
        problems.append(f"base_model: {spec.name} needs a base model; add `base_model:`")
    tok = m.tokenizer_source or (m.tokenizer.source if m.tokenizer else None)
    if tok == "union":
        problems.append("tokenizer_source: union (building a merged tokenizer) is not supported; "
                        "use `base` or a model path, with `vocab_mismatch: resize` if vocabularies differ")
    for i, sl in enumerate(recipe.output_slices()):
        where = f"slices[{i}]" if m.slices else "models"
        base = sl.base_model or recipe.base
        n = len([s for s in sl.sources if not (spec.base != "ignored" and s.model == base)])
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            want = (f"exactly {spec.min_models}" if spec.max_models == spec.min_models
                    else f"at least {spec.min_models}" + (f" and at most {spec.max_models}" if spec.max_models else ""))
            besides = " besides the base model" if spec.base != "ignored" else ""
            problems.append(f"{where}: {spec.name} merges {want} model(s){besides}, the recipe gives {n}")
        if m.slices:
            lengths = set()
            for j, s in enumerate(sl.sources):
                a, b = s.layer_range
                if not 0 <= a < b:
                    problems.append(f"slices[{i}].sources[{j}].layer_range: [{a}, {b}] must satisfy 0 <= start < end")
                lengths.add(b - a)
            if len(lengths) > 1:
                problems.append(f"slices[{i}]: every source must have the same number of layers, got {sorted(lengths)}")
    for key in ("dtype", "out_dtype"):
        text = getattr(m, key)
        if text is not None:
            from mergelab.checkpoint.reader import parse_dtype

            try:
                parse_dtype(text)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")


def _field_validator(cls, field: str):
    fi = cls.model_fields[field]
    adapter = TypeAdapter(fi.annotation)

    def check(value):
        # Validate one value through the whole model so Field bounds (gt, le, ...) apply.
        required = {n: f for n, f in cls.model_fields.items() if f.is_required() and n != field}
        dummy = {n: _dummy_for(f) for n, f in required.items()}
        cls.model_validate({**dummy, fi.alias or field: value})
        return adapter
    return check


def _dummy_for(field) -> Any:
    ann = field.annotation
    if ann is bool:
        return False
    return 1.0


def _check_parameters(recipe: Recipe, problems: list[str]) -> None:
    spec = recipe.method
    mfields = spec.model_params.model_fields
    sfields = spec.shared_params.model_fields

    def lookup(key, fields):
        for n, f in fields.items():
            if key == n or key == f.alias:
                return n
        return None

    def check_block(params: Mapping[str, Setting], where: str, allow_shared: bool) -> None:
        for key, setting in (params or {}).items():
            mname, sname = lookup(key, mfields), lookup(key, sfields)
            if mname is None and sname is None:
                names = spec.parameter_names()
                problems.append(f"{where}.{key} is not a parameter of {spec.name}{_suggest(key, names)}. "
                                f"Parameters of {spec.name}: {', '.join(names) or 'none'}.")
                continue
            if sname is not None and mname is None and not allow_shared:
                problems.append(f"{where}.{key} is a shared parameter of {spec.name}: set it under the "
                                "top-level `parameters:` instead of per model")
                continue
            cls, fname = (spec.model_params, mname) if mname else (spec.shared_params, sname)
            check = _field_validator(cls, fname)
            for value in _endpoints(setting):
                try:
                    check(value)
                except ValidationError as exc:
                    msg = next((e["msg"] for e in exc.errors() if e["loc"] and e["loc"][0] in (fname, key)),
                               exc.errors()[0]["msg"])
                    problems.append(f"{where}.{key}: {value!r} is not valid: {msg}")
                    break

    check_block(recipe.parameters, "parameters", allow_shared=True)
    m = recipe.model
    entries = [(f"models[{i}]", im.parameters or {}, im.model) for i, im in enumerate(m.models or [])]
    for i, sl in enumerate(m.slices or []):
        check_block(sl.parameters or {}, f"slices[{i}].parameters", allow_shared=True)
        entries += [(f"slices[{i}].sources[{j}]", s.parameters or {}, s.model) for j, s in enumerate(sl.sources)]
    for where, params, _ in entries:
        check_block(params, f"{where}.parameters", allow_shared=False)
    # Required per-model parameters must be set for every merged model, here or globally.
    required = [f.alias or n for n, f in mfields.items() if f.is_required()]
    for where, params, model_ref in entries:
        is_base = recipe.method.base != "ignored" and recipe.base is not None and \
            recipe._resolve(model_ref) == recipe.base
        if is_base:
            continue
        for r in required:
            if r not in params and r not in recipe.parameters and not any(
                    r in (sl.parameters or {}) for sl in (m.slices or [])):
                problems.append(f"{where}.parameters.{r} is required by {spec.name} for model '{model_ref}' "
                                f"(set it per model or under the top-level `parameters:`)")


def _check_paths(recipe: Recipe, problems: list[str]) -> None:
    for path in recipe.input_paths():
        if "+" in Path(path).name and not Path(path).exists():
            problems.append(f"model '{path}': MergeKit's 'model+lora' references are not supported yet; "
                            "merge the LoRA into its base first")
        elif not Path(path).exists():
            looks_hub = path.count("/") == 1 and not path.startswith((".", "/", "~"))
            hint = (" mergelab reads local paths only and downloads nothing; download the model first"
                    if looks_hub else " check the path (relative paths resolve against the current folder, "
                                      "then the recipe's folder)")
            problems.append(f"model '{path}' does not exist;{hint}")
