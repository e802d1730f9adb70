"""MergeKit 0.1.5's merge methods and their parameters, as its registry lists them.

Read from `mergekit.merge_methods.registry.registered_methods()` of mergekit
0.1.5 (tests/test_recipe_forms.py checks this table against it when mergekit is
installed). mergelab uses it for two messages only: a method MergeKit has and
mergelab lacks is named as such instead of "unknown", and a per-model or
shared parameter that MergeKit accepts (and ignores) for a method that does
not use it is listed as ignored rather than refused.
"""

from __future__ import annotations

_GTA = ("int8_mask", "normalize", "rescale", "lambda", "weight", "density")

MERGEKIT_METHODS: dict[str, tuple[str, ...]] = {
    "linear": ("weight", "normalize"),
    "slerp": ("t",),
    "nuslerp": ("weight", "nuslerp_row_wise", "nuslerp_flatten"),
    "multislerp": ("weight", "normalize_weights", "eps"),
    "karcher": ("max_iter", "tol"),
    "passthrough": ("scale",),
    "model_stock": ("filter_wise",),
    "nearswap": ("t",),
    "sce": ("int8_mask", "select_topk"),
    "arcee_fusion": (),
    "ram": ("epsilon",),
    "ramplus_tl": ("r", "alpha", "epsilon"),
    "task_arithmetic": _GTA,
    "ties": _GTA,
    "dare_ties": _GTA,
    "dare_linear": _GTA,
    "breadcrumbs": (*_GTA, "gamma"),
    "breadcrumbs_ties": (*_GTA, "gamma"),
    "della": (*_GTA, "epsilon"),
    "della_linear": (*_GTA, "epsilon"),
}


def not_implemented_hint(name: str, implemented) -> str | None:
    """"MergeKit's NAME is not implemented in mergelab ..." for a MergeKit method mergelab lacks, else None."""
    if name not in MERGEKIT_METHODS or name in implemented:
        return None
    return (f"MergeKit's {name} is not implemented in mergelab; choose another method "
            "(`mergelab methods` lists them) or run this recipe with mergekit")


def mergekit_parameter_names() -> set[str]:
    """Every parameter name some MergeKit 0.1.5 method takes."""
    return {p for params in MERGEKIT_METHODS.values() for p in params}
