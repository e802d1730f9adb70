"""The in-memory calls of the public API: merge tensors or state dicts with any registered method.

The library itself calls these (lora, distributed); `mergelab.api` re-exports them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import ValidationError

from mergelab.errors import MergeError, ShapeMismatch
from mergelab.methods import REGISTRY, MethodSpec, PerModel, get_method, run_method, spellings
from mergelab.methods.seeding import make_generator


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
