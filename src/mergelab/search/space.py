"""Recipe fields as coordinates: field paths, grids of values, and `{search: [lo, hi]}` ranges.

A field path names one value of a recipe as written, e.g. ``models[0].parameters.weight``
or ``parameters.lambda``. Sweeps set fields to grid values; searches read ranges
written in the recipe itself:

    models:
      - model: ./ft-a
        parameters:
          weight: {search: [0, 1]}                          # one coordinate
          density: {search: [0.1, 1], per_layer: 4}         # four: a gradient over the layers
          lambda: {search: [0.01, 2], log: true}            # sampled on a log scale

`per_layer: K` becomes a MergeKit gradient of K values (interpolated over the
layers), so the best point is a plain recipe that `mergelab merge` runs.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergelab.errors import MergeError, RecipeError

_TOKEN = re.compile(r"\s*(?:\.?([A-Za-z_][\w-]*)|\[(\d+)\])")
_SEARCH_KEYS = {"search", "per_layer", "log"}


def parse_path(path: str) -> list[str | int]:
    """'models[0].parameters.weight' -> ['models', 0, 'parameters', 'weight']."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if m is None or m.end() == pos:
            raise MergeError(f"field path {path!r}: cannot read it at {path[pos:]!r}; write it like "
                             "models[0].parameters.weight or parameters.lambda")
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not parts:
        raise MergeError("empty field path; write it like models[0].parameters.weight")
    return parts


def format_path(parts: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts))


def set_field(data: dict, path: str, value: Any) -> None:
    """Set the field at `path` in a recipe dict; a missing last key (or `parameters` block) is created."""
    parts = parse_path(path)
    node: Any = data
    for i, p in enumerate(parts[:-1]):
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            if isinstance(node, dict) and isinstance(p, str) and p == "parameters":
                node[p] = {}
                node = node[p]
                continue
            raise MergeError(f"field {path}: the recipe has no {format_path(parts[:i + 1])}; check the index "
                             "and the spelling against the recipe") from None
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise MergeError(f"field {path}: the recipe has no {format_path(parts)}")
    elif not isinstance(node, dict):
        raise MergeError(f"field {path}: {format_path(parts[:-1])} is not a mapping of fields")
    node[last] = value


@dataclasses.dataclass(frozen=True)
class SearchParam:
    """One `{search: [lo, hi]}` entry: where it is, its range, how many values (layer anchors) it takes."""

    path: str
    low: float
    high: float
    per_layer: int = 1
    log: bool = False
    integer: bool = False

    def names(self) -> list[str]:
        """Coordinate names: the path, or path[k] for each layer anchor."""
        return [self.path] if self.per_layer == 1 else [f"{self.path}[{k}]" for k in range(self.per_layer)]

    def value(self, coords: Mapping[str, float]) -> Any:
        values = [coords[n] for n in self.names()]
        return values[0] if self.per_layer == 1 else values


def _walk(node: Any, parts: list[str | int]):
    if isinstance(node, Mapping):
        if "search" in node:
            yield parts, node
            return
        for k, v in node.items():
            yield from _walk(v, [*parts, k])
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, [*parts, i])


def _parameter_name(parts: list[str | int]) -> str | None:
    """The method parameter a setting at `parts` belongs to: the key after the last `parameters`."""
    idx = [i for i, p in enumerate(parts) if p == "parameters"]
    return str(parts[idx[-1] + 1]) if idx and idx[-1] + 1 < len(parts) else None


def find_search_params(data: Mapping, source: str = "<recipe>") -> list[SearchParam]:
    """Every `{search: ...}` range of a recipe dict, each checked against its parameter's valid domain.

    Raises:
        RecipeError: listing every malformed range, unknown parameter, or range that leaves the
            parameter's domain (e.g. a density range reaching 0).
    """
    from mergelab.methods import REGISTRY
    from mergelab.recipe.params import method_fields

    spec = REGISTRY.get(str(data.get("merge_method")))
    fields = method_fields(spec) if spec is not None else {}
    problems, out = [], []
    for parts, entry in _walk(data, []):
        where = format_path(parts)
        extra = set(entry) - _SEARCH_KEYS
        rng = entry.get("search")
        if extra:
            problems.append(f"{where}: unknown key(s) {sorted(extra)} beside `search`; allowed: search, per_layer, log")
            continue
        if (not isinstance(rng, list) or len(rng) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)):
            problems.append(f"{where}.search: {rng!r} is not a range; write [low, high] with two numbers")
            continue
        low, high = float(rng[0]), float(rng[1])
        per_layer, log = entry.get("per_layer", 1), bool(entry.get("log", False))
        if not isinstance(per_layer, int) or isinstance(per_layer, bool) or per_layer < 1:
            problems.append(f"{where}.per_layer: {per_layer!r} is not a whole number >= 1")
            continue
        if not low < high:
            problems.append(f"{where}.search: low {low:g} is not below high {high:g}; write [low, high]")
            continue
        if log and low <= 0:
            problems.append(f"{where}.search: a log-scale range needs low > 0, got {low:g}")
            continue
        name = _parameter_name(parts)
        if spec is None or name is None:
            problems.append(f"{where}: only method parameters (inside a `parameters:` block of a recipe with a "
                            "known merge_method) can be searched")
            continue
        pf = fields.get(name)
        if pf is None:
            problems.append(f"{where}: {name} is not a parameter of {spec.name}; its parameters: "
                            f"{', '.join(spec.parameter_names())}")
            continue
        if pf.info.annotation not in (float, int):
            problems.append(f"{where}: {name} is not numeric ({pf.rule()}); only numbers can be searched")
            continue
        for bound in (low, high):
            try:
                pf.check(int(bound) if pf.info.annotation is int else bound)
            except ValidationError:
                problems.append(f"{where}.search: range [{low:g}, {high:g}] leaves the valid domain of "
                                f"{spec.name}'s {name} at {bound:g}; {pf.rule()}")
                break
        else:
            out.append(SearchParam(where, low, high, per_layer, log, pf.info.annotation is int))
    if problems:
        raise RecipeError(problems, source)
    return out


def instantiate(data: Mapping, params: Sequence[SearchParam], coords: Mapping[str, float]) -> dict:
    """A plain recipe dict: every searched field replaced by its value at `coords`."""
    out = copy.deepcopy(dict(data))
    for p in params:
        value = p.value(coords)
        if p.integer:
            value = [int(round(v)) for v in value] if isinstance(value, list) else int(round(value))
        set_field(out, p.path, value)
    return out


_PATH_FIELDS = ("model", "base_model", "stats", "tokenizer_source")


def resolve_model_paths(data: Mapping, folder: Path | None) -> dict:
    """A copy of a recipe dict whose relative model, base and stats paths are made absolute against
    the recipe's folder (paths that do not exist there are left as written, e.g. Hub ids)."""
    out = copy.deepcopy(dict(data))
    if folder is None:
        return out

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in _PATH_FIELDS and isinstance(v, str) and not Path(v).expanduser().is_absolute():
                    cand = (folder / Path(v).expanduser())
                    if cand.exists():
                        node[k] = str(cand.resolve())
                else:
                    fix(v)
        elif isinstance(node, list):
            for v in node:
                fix(v)

    fix(out)
    return out


def read_recipe_dict(path: Path) -> dict:
    """A recipe file as a dict with its model paths resolved against its folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MergeError(f"recipe file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {exc}", path.name) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping of fields with at least `merge_method` and `models`", path.name)
    return resolve_model_paths(data, path.parent)
