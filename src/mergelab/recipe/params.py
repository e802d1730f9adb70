"""Parameter settings of a recipe: their shapes, their checks, and their value at one tensor.

A setting is what a recipe writes after a parameter name, in MergeKit's format:

    weight: 0.5                                     # a scalar
    density: [1.0, 0.7, 0.1]                        # a gradient over the layers
    t: [{filter: self_attn, value: [0, 1]},         # conditions on the tensor name:
        {filter: mlp, value: 0.8}, {value: 0.5}]    #   the first that matches wins
    t: {filter: mlp, value: 0.3}                    # a single condition

`evaluate_setting` gives a setting's value at one tensor exactly as MergeKit's
function of the same name does; the checks below find every malformed setting,
unknown name, wrong scope and out-of-range value before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types as at
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from mergelab.methods import REGISTRY, MethodSpec
from mergelab.mergekit_names import mergekit_parameter_names

Setting = Any  # scalar | list of scalars | {filter, value} | list of {filter, value}

_SCALARS = (bool, int, float, str)
_CONDITION_KEYS = ("filter", "value")


def suggest(word: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_scalar(v: Any) -> bool:
    return isinstance(v, _SCALARS)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate_setting(setting: Setting, tensor_name: str, t: float,
                     validate: Callable[[Any], Any] | None = None) -> Any:
    """The value of `setting` for tensor `tensor_name` at layer position `t`, or None if unset.

    MergeKit's rule (mergekit.config.evaluate_setting): each scalar is first
    converted by `validate` (the parameter's type, so "1e-3" becomes a number
    for a float parameter); a list of numbers is a gradient, read by linear
    interpolation at position t * (n - 1) over n evenly spaced points; a list
    that is not all numbers (booleans, strings) picks values[int(t * (n - 1))];
    in a list of conditions the first whose `filter` is a substring of the
    tensor name (or that has no filter, or filter "*") gives the value. A
    condition list that matches nothing, and an empty list, give None.

    Args:
        setting: a checked setting (see `setting_problems`).
        tensor_name: the tensor's name, matched against filters.
        t: position in [0, 1] of the tensor's layer within its slice (0 outside layers).
        validate: converts one scalar to the parameter's type; identity when None.
    """
    check = validate or (lambda v: v)
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return check(setting)
    if not isinstance(setting, list) or not setting:
        return None
    if all(_is_scalar(v) for v in setting):
        values = [check(v) for v in setting]
        pos = t * (len(values) - 1)
        if not all(_is_number(v) for v in values):
            return values[int(pos)]
        i0 = int(pos)
        i1 = min(len(values) - 1, i0 + 1)
        frac = pos - i0
        # Same expression as MergeKit, so gradients agree with it to the last bit.
        return check((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        filt = cond.get("filter")
        if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, validate)
    return None


def setting_problems(setting: Setting, where: str) -> list[str]:
    """What is malformed in one setting; `where` is its field path (e.g. parameters.t)."""
    if setting is None:
        return [f"{where} has no value; give a number, a gradient [a, b, ...] or a list of "
                "{filter, value} conditions, or remove it"]
    if _is_scalar(setting):
        return []
    if isinstance(setting, Mapping):
        return _condition_problems(setting, where)
    if not isinstance(setting, list):
        return [f"{where}: {setting!r} is not a value; give a number, a gradient or conditions"]
    if not setting:
        return [f"{where} is an empty list, which sets nothing; give a value or remove it"]
    if all(_is_scalar(v) for v in setting):
        return []
    if all(isinstance(v, Mapping) for v in setting):
        return [p for i, c in enumerate(setting) for p in _condition_problems(c, f"{where}[{i}]")]
    return [f"{where} mixes plain values and {{filter, value}} conditions; use a gradient "
            "(a list of values) or a list of conditions, not both"]


def _condition_problems(cond: Mapping, where: str) -> list[str]:
    out = []
    for key in cond:
        if key not in _CONDITION_KEYS:
            # A typo'd `filter` must not silently turn a condition into a catch-all.
            out.append(f"{where}.{key} is not a condition key{suggest(key, _CONDITION_KEYS)}; "
                       "a condition has `filter` (part of a tensor name) and `value`")
    if "value" not in cond:
        out.append(f"{where} has no `value`; a condition is {{filter: NAME_PART, value: VALUE}}")
    else:
        value = cond["value"]
        ok = _is_scalar(value) or (isinstance(value, list) and value and all(_is_scalar(v) for v in value))
        if not ok:
            out.append(f"{where}.value: {value!r} must be a value or a gradient (a non-empty list of values)")
    if "filter" in cond and cond["filter"] is not None and not isinstance(cond["filter"], str):
        out.append(f"{where}.filter: {cond['filter']!r} must be text, a part of tensor names such as 'mlp'")
    return out


def setting_endpoints(setting: Setting, where: str) -> list[tuple[str, Any]]:
    """(field path, value) of every concrete value a well-formed setting holds.

    Interpolation stays between neighbouring endpoints, so checking these checks
    every value a gradient can produce against interval bounds.
    """
    if isinstance(setting, Mapping):
        return setting_endpoints(setting["value"], f"{where}.value")
    if isinstance(setting, list):
        if all(_is_scalar(v) for v in setting):
            return [(f"{where}[{i}]", v) for i, v in enumerate(setting)]
        return [e for i, c in enumerate(setting) for e in setting_endpoints(c["value"], f"{where}[{i}].value")]
    return [(where, setting)]


@dataclasses.dataclass(frozen=True)
class ParamField:
    """One parameter of a method as recipes spell it, with its scope and checks."""

    name: str  # as written in recipes (the alias when there is one, e.g. `lambda`)
    attr: str  # the pydantic field name
    per_model: bool
    info: FieldInfo

    @property
    def convert(self) -> Callable[[Any], Any]:
        """Type conversion only (MergeKit's validate): bounds are checked once, at load."""
        return _adapter(self.info.annotation).validate_python

    def check(self, value: Any) -> None:
        """Raise ValidationError unless `value` has the field's type and bounds."""
        meta = self.info.metadata
        _adapter(Annotated[self.info.annotation, *meta] if meta else self.info.annotation).validate_python(value)

    def rule(self) -> str:
        """The field's type and bounds in words, e.g. 'density must be a number with 0 < density <= 1'."""
        lo = next((f"{m.gt} < " for m in self.info.metadata if isinstance(m, at.Gt)), "") or next(
            (f"{m.ge} <= " for m in self.info.metadata if isinstance(m, at.Ge)), "")
        hi = next((f" < {m.lt}" for m in self.info.metadata if isinstance(m, at.Lt)), "") or next(
            (f" <= {m.le}" for m in self.info.metadata if isinstance(m, at.Le)), "")
        bounds = f" with {lo}{self.name}{hi}" if lo or hi else ""
        return f"{self.name} must be {_kind(self.info.annotation)}{bounds}"


@functools.lru_cache(maxsize=None)
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation)


def _kind(annotation: Any) -> str:
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        kinds = [_kind(a) for a in get_args(annotation) if a is not type(None)]
        return " or ".join(kinds)
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


@functools.lru_cache(maxsize=None)
def method_fields(spec: MethodSpec) -> dict[str, ParamField]:
    """Every parameter of `spec`, keyed by its recipe spelling and by its field name."""
    out: dict[str, ParamField] = {}
    for per_model, model in ((True, spec.model_params), (False, spec.shared_params)):
        for attr, info in model.model_fields.items():
            pf = ParamField(info.alias or attr, attr, per_model, info)
            out.setdefault(pf.name, pf)
            out.setdefault(attr, pf)
    return out


def parameter_problems(spec: MethodSpec, params: Mapping[str, Setting] | None, where: str,
                       *, model_level: bool) -> list[str]:
    """Every problem of one `parameters:` block: unknown names, wrong scope, bad shapes and values.

    Args:
        where: the block's field path, e.g. "models[1].parameters".
        model_level: the block belongs to one model (shared parameters are errors there).
    """
    fields = method_fields(spec)
    out: list[str] = []
    for key, setting in (params or {}).items():
        path = f"{where}.{key}"
        pf = fields.get(key)
        if pf is None and _known_elsewhere(key):
            out += setting_problems(setting, path)  # ignored (see ignored_parameters), but must be readable
            continue
        if pf is None:
            names = spec.parameter_names()
            out.append(f"{path} is not a parameter of {spec.name}{suggest(key, names)}. "
                       f"Parameters of {spec.name}: {', '.join(names) or 'none'}.")
            continue
        if model_level and not pf.per_model:
            out.append(f"{path}: {pf.name} is a shared parameter of {spec.name} (one value per tensor "
                       "for the whole merge); set it under the top-level or the slice's `parameters:`")
            continue
        shape = setting_problems(setting, path)
        if shape:
            out += shape
            continue
        out += _value_problems(pf, setting, path)
    return out


def _value_problems(pf: ParamField, setting: Setting, path: str) -> list[str]:
    out = []
    for at_path, value in setting_endpoints(setting, path):
        try:
            pf.check(value)
        except ValidationError:
            out.append(f"{at_path}: {value!r} is not valid; {pf.rule()}")
    if pf.info.annotation is int and _has_fractional_gradient(setting):
        out.append(f"{path}: {pf.name} takes whole numbers, but a gradient between different values "
                   "interpolates fractions; give one value, or use filters for different values")
    return out


def _has_fractional_gradient(setting: Setting) -> bool:
    if isinstance(setting, Mapping):
        return _has_fractional_gradient(setting["value"])
    if isinstance(setting, list):
        if all(_is_scalar(v) for v in setting):
            return len(set(setting)) > 1
        return any(_has_fractional_gradient(c["value"]) for c in setting)
    return False


def recipe_parameter_problems(recipe: Any) -> list[str]:
    """Every parameter problem of a Recipe: each block, required per-model values, `stats:`."""
    spec = recipe.method
    out = parameter_problems(spec, recipe.parameters, "parameters", model_level=False)
    entries = []  # (field path, model entry, the slice's parameters, the base that applies)
    for i, m in enumerate(recipe.models or []):
        entries.append((f"models[{i}]", m, None, recipe.base))
    for i, sl in enumerate(recipe.slices or []):
        out += parameter_problems(spec, sl.parameters, f"slices[{i}].parameters", model_level=False)
        base = recipe.resolve(sl.base_model) if sl.base_model else recipe.base
        entries += [(f"slices[{i}].sources[{j}]", s, sl.parameters, base) for j, s in enumerate(sl.sources)]
    required = [pf for key, pf in method_fields(spec).items()
                if key == pf.name and pf.per_model and pf.info.is_required()]
    for where, entry, slice_params, base in entries:
        out += parameter_problems(spec, entry.parameters, f"{where}.parameters", model_level=True)
        if spec.base != "ignored" and base is not None and recipe.resolve(entry.model) == base:
            continue  # the base is not a row of x: it takes no per-model parameters
        for pf in required:
            if not any(pf.name in (lv or {}) or pf.attr in (lv or {})
                       for lv in (entry.parameters, slice_params, recipe.parameters)):
                out.append(f"{where}.parameters.{pf.name} is missing: {spec.name} needs a {pf.name} for every "
                           f"model ('{entry.model}'); set it here, or once under the top-level `parameters:`")
        if spec.needs_stats and not entry.stats:
            out.append(f"{where}.stats is missing: {spec.name} weighs each model by its statistics; compute "
                       "them with `mergelab stats` and give the file as `stats: PATH`")
        elif entry.stats and not spec.needs_stats:
            out.append(f"{where}.stats: {spec.name} uses no statistics; remove it")
    if getattr(recipe, "base_stats", None) and not spec.uses_base_stats:
        out.append(f"base_stats: {spec.name} uses no statistics of the base model; remove it")
    return out


def _known_elsewhere(key: str) -> bool:
    """A parameter of some method (mergelab's or MergeKit 0.1.5's): for others it is ignored, as in MergeKit."""
    return key in mergekit_parameter_names() or any(key in spec.parameter_names() for spec in REGISTRY.values())


def ignored_parameters(recipe: Any) -> list[str]:
    """Settings the recipe gives that its method does not use, one note each, as MergeKit ignores them.

    Two kinds: a parameter of other methods only (e.g. `weight` on slerp, which MergeKit's own
    tests write), and a per-model parameter on the base model of a method that takes the base
    apart (the base is no row of x; MergeKit's non-base parameters skip it too). A name that is a
    parameter of no method is an error instead (see `parameter_problems`).
    """
    spec = recipe.method
    fields = method_fields(spec)
    blocks = [("parameters", recipe.parameters, False)]
    blocks += [(f"slices[{i}].parameters", sl.parameters, False) for i, sl in enumerate(recipe.slices or [])]
    entries = [(f"models[{i}]", m, recipe.base) for i, m in enumerate(recipe.models or [])]
    for i, sl in enumerate(recipe.slices or []):
        base = recipe.resolve(sl.base_model) if sl.base_model else recipe.base
        entries += [(f"slices[{i}].sources[{j}]", s, base) for j, s in enumerate(sl.sources)]
    out = []
    for where, entry, base in entries:
        is_base = spec.base != "ignored" and base is not None and recipe.resolve(entry.model) == base
        blocks.append((f"{where}.parameters", entry.parameters, is_base))
    for where, params, is_base in blocks:
        for key in params or {}:
            pf = fields.get(key)
            if pf is None and _known_elsewhere(key):
                out.append(f"{where}.{key}: {spec.name} has no parameter {key}; ignored (as MergeKit does)")
            elif pf is not None and pf.per_model and is_base:
                out.append(f"{where}.{key}: the base model of {spec.name} takes no per-model parameters; "
                           "ignored (as MergeKit does)")
    return out
