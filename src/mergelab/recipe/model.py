"""The recipe as data: MergeKit's fields as written (pydantic), plus where its model references point.

    merge_method: ties
    base_model: ./base
    models:
      - model: ./ft-a
        parameters: {weight: 0.5, density: [1.0, 0.5]}      # a gradient over layers
    parameters:
      normalize: true
    dtype: bfloat16

A `Recipe` is built by `mergelab.recipe.load_recipe` (reading and validation)
and pointed at local folders by `mergelab.recipe.resolve` (Hub ids, adapters).
`Recipe.parameters_for` resolves a tensor's parameter settings the way MergeKit
does (global, then slice, then model; gradients and filters are in params.py).
docs/recipes.md describes the format.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from mergelab.checkpoint.peft import is_adapter_folder
from mergelab.checkpoint.reader import parse_dtype
from mergelab.methods import REGISTRY, MethodSpec
from mergelab.recipe.params import Setting, evaluate_setting, ignored_parameters, method_fields
from mergelab.tokenizer.config import TokenizerEntry

__all__ = ["Recipe", "ModelEntry", "SourceEntry", "SliceEntry", "AdapterEntry", "OutputSlice", "Source"]


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

    def located(self, paths: Mapping[str, str], source_name: str | None = None) -> Recipe:
        """A copy of this recipe whose model references (as written) resolve to `paths`, the others as
        before; `source_name` names the recipe in messages (its file name)."""
        new = self.model_copy()
        new._source_name = self._source_name if source_name is None else source_name
        new._paths = {**self._paths, **paths}
        return new

    @property
    def source_name(self) -> str:
        return self._source_name

    @property
    def paths(self) -> dict[str, str]:
        """{model reference as written: the path it resolves to}, for every reference the recipe names."""
        return dict(self._paths)

    @property
    def method(self) -> MethodSpec:
        return REGISTRY[self.merge_method]

    def resolve(self, ref: str) -> str:
        """The path a model reference resolves to (see `located`); else the reference as a path."""
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
        return self.base not in models and not any(is_adapter_folder(m) for m in models)

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
        """Settings the method does not use, accepted as MergeKit accepts them (see recipe.params)."""
        return ignored_parameters(self)

    def to_yaml(self) -> str:
        """The recipe as given (fields as written, model references unresolved), for the output's copy."""
        data = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return yaml.safe_dump(data, sort_keys=False)

