"""AdaMerging's learned coefficients as a plain task_arithmetic recipe (mergelab and MergeKit).

task_arithmetic merges theta = theta_base + lambda * sum_k w_k tau_k (normalize off),
so with the shared `lambda: 1` each model's `weight` is its learned lambda_k:

- task-wise: `weight: lambda_k`, one number per model;
- layer-wise: `weight` a list of conditions, one `{filter: TENSOR, value: lambda_k,i}`
  per parameter tensor, ending with `{value: 0}` (every other tensor, i.e. buffers and
  frozen parameters, stays the base's, as in the merged model AdaMerging trained).

Filters are substrings (MergeKit's rule: the first condition whose filter occurs in the
tensor name wins), so the conditions are listed longest name first: a tensor's own
name is then the first filter it contains (any longer filter cannot occur in it, and a
filter of equal length occurring in it is its name), and `0.weight` cannot capture
`10.weight`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergelab.errors import MergeError


def weight_conditions(values: dict[str, float], fallback: float = 0.0) -> list[dict[str, Any]]:
    """MergeKit conditions giving each tensor named in `values` exactly its value, and `fallback` elsewhere."""
    ordered = sorted(values, key=lambda n: (-len(n), n))
    return [*({"filter": n, "value": float(values[n])} for n in ordered), {"value": float(fallback)}]


def adamerging_recipe(result: Any, base_model: str, models: Sequence[str], *, dtype: str | None = None,
                      per_tensor: bool | None = None) -> dict[str, Any]:
    """The task_arithmetic recipe that merges `models` onto `base_model` with `result`'s coefficients.

    Args:
        result: an AdaMergingResult (coefficients() gives tensor -> K values).
        base_model, models: the paths (or Hub ids) the recipe names, in the order AdaMerging saw the models.
        dtype: the recipe's `dtype`, if any.
        per_tensor: write per-tensor conditions (default: for layer-wise results, and for task-wise ones
            whose model has buffers or frozen parameters, which must stay the base's).
    """
    coeffs = result.coefficients()
    if len(models) != result.lambdas.shape[0]:
        raise MergeError(f"the coefficients are for {result.lambdas.shape[0]} models but {len(models)} model "
                         "paths were given")
    if per_tensor is None:
        per_tensor = result.granularity == "layer" or bool(result.fixed)
    entries = []
    for k, path in enumerate(models):
        if per_tensor:
            weight: Any = weight_conditions({n: v[k] for n, v in coeffs.items()})
        else:
            weight = float(result.lambdas[k])
        entries.append({"model": str(path), "parameters": {"weight": weight}})
    recipe: dict[str, Any] = {"merge_method": "task_arithmetic", "base_model": str(base_model), "models": entries,
                              "parameters": {"lambda": 1.0, "normalize": False}}
    if dtype is not None:
        recipe["dtype"] = dtype
    return recipe
