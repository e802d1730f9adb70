"""The registry of merge methods: parameter models, MethodSpec, @merge_method, run_method, get_method.

Family modules import this module to register their methods; mergelab.methods imports the
families (see its docstring for the calling convention every method follows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

BasePolicy = Literal["required", "optional", "ignored"]


class MethodParams(BaseModel):
    """Base of every parameter model: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NoParams(MethodParams):
    """A method without parameters of this kind."""


P = TypeVar("P", bound=MethodParams)


@dataclasses.dataclass(frozen=True)
class SideOutputs:
    """What a method computes besides the merged tensor, from which each task's model can be rebuilt.

    tensor_fn(x, base, p, s, merged) -> {key: tensor}: per output tensor, from the method's own float32
        inputs and result (e.g. bit-packed per-task masks, per-task sums for run-level numbers).
    summary_fn({tensor name: {key: tensor}}, s) -> dict: run-level numbers (plain data) from every
        tensor's side tensors, after the last one (e.g. EMR's rescalers, a global sum over tensors).
    rebuild_fn(merged, base, side, info, task) -> tensor: task `task`'s tensor (float32) from the merged
        and base tensors (float32), that tensor's side tensors and info = {"params": the tensor's shared
        parameters as a recipe spells them, "summary": summary_fn's numbers}.
    """

    tensor_fn: Callable[..., dict[str, torch.Tensor]]
    summary_fn: Callable[..., dict[str, Any]]
    rebuild_fn: Callable[..., torch.Tensor]


def spellings(params: type[MethodParams]) -> dict[str, str]:
    """Every key a recipe or call may use for `params`' fields (name or alias) -> the field name."""
    out = {}
    for name, field in params.model_fields.items():
        out[name] = name
        if field.alias:
            out[field.alias] = name
    return out


class PerModel(Generic[P]):
    """Per-model parameters of one merge, one entry per row of ``x``.

    ``p[i]`` is model i's parameter object, ``p.values("weight")`` the list of
    its values, ``p.tensor("weight", like=x)`` the same as a float tensor (N,)
    on x's device.
    """

    def __init__(self, items: Sequence[P]):
        self.items: tuple[P, ...] = tuple(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> P:
        return self.items[i]

    def __iter__(self):
        return iter(self.items)

    def values(self, name: str) -> list[Any]:
        return [getattr(item, name) for item in self.items]

    def tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return torch.tensor([float(v) for v in self.values(name)], dtype=dtype, device=like.device)

    def __repr__(self) -> str:
        return f"PerModel({list(self.items)!r})"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Everything the recipe validator, the engine and `mergelab methods` know of a method."""

    name: str
    fn: Callable[..., torch.Tensor]
    model_params: type[MethodParams]
    shared_params: type[MethodParams]
    base: BasePolicy
    min_models: int
    max_models: int | None
    randomized: bool
    elementwise: bool
    needs_stats: bool
    doc: str
    divides_by_weight_sum: bool = False
    kernel: Any = None  # a methods.kernels.Kernel, or None
    uses_base_stats: bool = False
    side_outputs: SideOutputs | None = None  # per-task side data written beside the model (task_models.py)

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def parameter_names(self) -> list[str]:
        """Names as recipes spell them (a field's alias when it has one, e.g. `lambda`)."""
        fields = {**self.model_params.model_fields, **self.shared_params.model_fields}
        return [f.alias or name for name, f in fields.items()]

    def describe(self) -> dict[str, Any]:
        """Plain-data description: parameters with their scope, default and meaning."""
        params = {}
        for scope, model in (("per-model", self.model_params), ("shared", self.shared_params)):
            for fname, field in model.model_fields.items():
                pname = field.alias or fname
                params[pname] = {
                    "scope": scope,
                    "required": field.is_required(),
                    "default": None if field.is_required() else field.default,
                    "description": field.description or "",
                }
        return {
            "name": self.name,
            "parameters": params,
            "base": self.base,
            "needs_base": self.needs_base,
            "needs_stats": self.needs_stats,
            "uses_base_stats": self.uses_base_stats,
            "randomized": self.randomized,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "doc": self.doc,
        }


REGISTRY: dict[str, MethodSpec] = {}


def merge_method(
    name: str,
    *,
    model_params: type[MethodParams] = NoParams,
    shared_params: type[MethodParams] = NoParams,
    base: BasePolicy = "ignored",
    min_models: int = 1,
    max_models: int | None = None,
    randomized: bool = False,
    elementwise: bool = False,
    needs_stats: bool = False,
    divides_by_weight_sum: bool = False,
    kernel: Any = None,
    uses_base_stats: bool = False,
    side_outputs: SideOutputs | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn`` under ``name``.

    Args:
        model_params: parameters set per model (e.g. weight, density).
        shared_params: parameters set once for the merge (e.g. normalize, t).
        base: whether the method needs a base model ("required"), can use one
            ("optional": x holds the non-base models and base may be None), or
            treats every input alike ("ignored").
        min_models / max_models: bounds on the number of rows of x.
        randomized: takes a seeded generator.
        elementwise: output[i] depends on inputs[i] only (and on per-model
            scalars), so the engine may process a big tensor in row chunks.
        needs_stats: takes per-model statistics tensors.
        divides_by_weight_sum: with the shared `normalize` set, divides by sum_i weight_i;
            the planner refuses weights summing to zero before any tensor is read.
        kernel: a compiled accelerator (methods.kernels.Kernel) giving the same
            numbers from the inputs as stored; `run_method` picks it where its
            `supports` predicate accepts the inputs.
        uses_base_stats: also takes the base model's statistics (`base_stats=`), given
            in a recipe as the top-level `base_stats: PATH`.
        side_outputs: per-task data kept beside the merged model (SideOutputs: tall_masks, emr).
    """

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} is registered twice")
        REGISTRY[name] = MethodSpec(
            name=name, fn=fn, model_params=model_params, shared_params=shared_params, base=base,
            min_models=min_models, max_models=max_models, randomized=randomized, elementwise=elementwise,
            needs_stats=needs_stats, kernel=kernel, uses_base_stats=uses_base_stats,
            divides_by_weight_sum=divides_by_weight_sum, side_outputs=side_outputs, doc=(fn.__doc__ or "").strip(),
        )
        return fn

    return register


def run_method(spec: MethodSpec, xs: Sequence[torch.Tensor], base: torch.Tensor | None, p: PerModel,
               s: MethodParams, gen: torch.Generator | None = None, *, out_dtype: torch.dtype | None = None,
               compute_dtype: torch.dtype = torch.float32, side: dict | None = None, **stats: Any) -> torch.Tensor:
    """Run a method the one way the engine, the Python API and the tests all do.

    Args:
        xs: one tensor per model (rows of x), as stored, all of one shape.
        base: the base model's tensor as stored, or None.
        p, s, gen: per-model parameters, shared parameters, seeded generator.
        out_dtype: dtype of the result (default: the first input's).
        compute_dtype: what the reference computes in (float32, or float64 for float64 inputs).
        side: for a method with side outputs, filled with its SideOutputs.tensor_fn tensors (or the
            same tensors from its kernel's `run_side`, where it has one).
        **stats: `stats` / `base_stats` tensors for methods that need statistics.

    The method's kernel runs when kernels are on (methods.kernels), the compute
    dtype is float32, no statistics are involved, and its `supports` accepts the
    inputs; otherwise the inputs are stacked into one (N, *shape) tensor of
    compute_dtype (one conversion pass, straight from the stored bytes) and the
    readable reference runs.
    """
    from mergelab.methods.kernels import kernels_enabled

    out_dtype = out_dtype or xs[0].dtype
    want_side = side is not None and spec.side_outputs is not None
    if (spec.kernel is not None and kernels_enabled() and compute_dtype == torch.float32 and not stats
            and spec.kernel.supports(xs, base, p, s)):
        if not want_side:
            return spec.kernel.run(xs, base, p, s, gen, out_dtype)
        run_side = spec.kernel.entry("run_side")  # a kernel that also makes the side tensors (emr)
        if run_side is not None:
            merged, tensors = run_side(xs, base, p, s, gen, out_dtype)
            side.update(tensors)
            return merged
    x = torch.empty((len(xs), *xs[0].shape), dtype=compute_dtype, device=xs[0].device)
    for row, t in zip(x, xs):
        row.copy_(t)
    b = base.to(compute_dtype) if base is not None else None
    stacked = {k: v.to(compute_dtype) if isinstance(v, torch.Tensor) else v for k, v in stats.items()}
    merged = spec.fn(x, b, p, s, gen, **stacked)
    if want_side:
        side.update(spec.side_outputs.tensor_fn(x, b, p, s, merged))
    return merged.to(out_dtype)


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; KeyError with the closest names if unknown."""
    try:
        return REGISTRY[name]
    except KeyError:
        import difflib

        from mergelab.mergekit_names import not_implemented_hint

        hint = not_implemented_hint(name, REGISTRY)
        if hint:
            raise KeyError(hint) from None
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise KeyError(f"unknown merge method {name!r}{hint}; run `mergelab methods` for the list") from None
