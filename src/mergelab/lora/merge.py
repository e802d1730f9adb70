"""Merge LoRA adapters with any mergelab method, exactly.

Each adapted layer's full update delta_i = s_i B_i A_i is one input of the merge
(task-vector methods see it as a task vector over a zero base). Two paths:

- linear-type methods (`linear`, `task_arithmetic` with density 1): the merge is
  sum_i c_i delta_i, with c_i obtained by running the method itself on unit probes;
  the result stays factored (B_cat, A_cat) and is truncated by QR + a small SVD
  (algebra.truncate_factored) or written as the exact concatenation (`cat`);
- every other method (TIES, DARE, breadcrumbs, SLERP, ...) acts on the entries of
  the update, so each layer's dense (m, n) updates are formed, merged by
  `mergelab.merge_tensors` and truncated by a dense SVD, one layer at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

from mergelab.errors import MergeError
from mergelab.lora.algebra import captured_energy, knots_basis, stack_factors, truncate_dense, truncate_factored
from mergelab.lora.peft_format import LoraLayer

__all__ = ["LINEAR_METHODS", "linear_coefficients", "merge_lora_layers", "merge_module", "module_groups",
           "module_path", "output_rank", "LayerReport"]

# Methods whose result is a fixed linear combination of the inputs (given their parameters).
LINEAR_METHODS = ("linear", "task_arithmetic")

Combine = Literal["svd", "cat", "full"]


@dataclasses.dataclass
class LayerReport:
    module: str
    adapters: list[int]  # indices of the adapters that adapt this module
    path: str  # "factored" or "dense"
    rank: int  # rank written (0 for full updates)
    energy: float  # share of the merged update's squared norm kept


def _base_policy(method: str) -> str:
    from mergelab.methods import get_method

    try:
        return get_method(method).base
    except KeyError as exc:
        raise MergeError(exc.args[0]) from None


def linear_coefficients(method: str, n: int, params: Mapping[str, Any]) -> list[float] | None:
    """c_i with method(x_1..x_n) = sum_i c_i x_i for a linear-type method, else None.

    The coefficients come from the method itself applied to unit probes (x_i = e_i),
    so its normalisation, lambda and weights are honoured as it implements them.
    """
    if method not in LINEAR_METHODS:
        return None
    density = params.get("density", 1.0)
    if any(d < 1 for d in (density if isinstance(density, (list, tuple)) else [density])):
        return None
    from mergelab.methods.calls import merge_tensors

    probes = list(torch.eye(n, dtype=torch.float64))  # n tensors of shape (n,)
    base = torch.zeros(n, dtype=torch.float64) if _base_policy(method) != "ignored" else None
    return merge_tensors(method, probes, base=base, **params).tolist()


def _to2d(layer: LoraLayer, delta: torch.Tensor) -> torch.Tensor:
    """Stored-shape update -> the (m, n) matrix of the layer's factors."""
    return delta.T if layer.layout == "transposed" else delta.reshape(layer.B.shape[0], -1)


def merge_dense(method: str, layers: Sequence[LoraLayer], params: Mapping[str, Any], *,
                seed: int | None = None) -> torch.Tensor:
    """The merged update of one module, dense in the stored weight's shape (float32)."""
    from mergelab.methods.calls import merge_tensors

    deltas = [layer.delta() for layer in layers]
    base = torch.zeros_like(deltas[0]) if _base_policy(method) != "ignored" else None
    return merge_tensors(method, deltas, base=base, seed=seed, name=layers[0].weight_name, **params)


def merge_knots(method: str, layers: Sequence[LoraLayer], params: Mapping[str, Any], *,
                seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KnOTS: merge the updates' coordinates V_i^T in their shared SVD basis, then map back.

        dW = (U S) method(V_1^T, ..., V_N^T)      (see algebra.knots_basis)

    Any method applies; its inputs are the (k, n) V_i^T as task vectors over a zero base.
    With a linear method this equals merging the updates directly. arXiv:2410.19735.

    Returns:
        (B (m, k), A (k, n)) with B @ A the merged update as an (m, n) matrix.
    """
    from mergelab.methods.calls import merge_tensors

    us, vts = knots_basis([x.B for x in layers], [x.A for x in layers])
    base = torch.zeros_like(vts[0]) if _base_policy(method) != "ignored" else None
    merged = merge_tensors(method, vts, base=base, seed=seed, name=layers[0].weight_name, **params)
    return us, merged


def module_path(method: str, n: int, params: Mapping[str, Any], combine: Combine, align: str | None) -> str:
    """How a module adapted by `n` adapters is merged: "knots" (align), "factored" (a linear-type merge:
    stacked factors) or "dense" (the updates formed); MergeError where `combine` cannot be written so."""
    if align == "knots":
        if combine == "cat":
            raise MergeError("KnOTS merges in a shared basis; write it with `rank: R` (or as a full model), not cat")
        return "knots"
    if linear_coefficients(method, n, params) is not None:
        return "factored"
    if combine == "cat":
        raise MergeError(f"`combine: cat` is exact only for linear-type merges ({', '.join(LINEAR_METHODS)} "
                         f"with density 1); {method} changes entries of the update: use `adapter: {{rank: R}}`")
    return "dense"


def output_rank(path: str, combine: Combine, rank: int | None, ranks: Sequence[int], m: int, n: int) -> int:
    """The rank of the factors _one_module returns for (m, n) updates of ranks `ranks`, from shapes alone
    (0 for "full"): cat keeps K = sum(ranks); svd keeps min(R, m, n) singular values (truncate_dense),
    at most K of them on the factored and knots paths (truncate_factored: min(R, m, n, K))."""
    if combine == "full":
        return 0
    if combine == "cat":
        return sum(ranks)
    k = min(rank, m, n)
    return k if path == "dense" else min(k, sum(ranks))


def _one_module(method: str, layers: list[LoraLayer], params: Mapping[str, Any], combine: Combine,
                rank: int | None, seed: int | None, align: str | None = None) -> tuple[LoraLayer | torch.Tensor, str, float]:
    ref = layers[0]
    path = module_path(method, len(layers), params, combine, align)
    if path == "knots":
        b, a = merge_knots(method, layers, params, seed=seed)  # (m, k), (k, n)
        if combine == "full":
            return ref.to_weight(b @ a), "knots", 1.0
        bk, ak, s = truncate_factored(b, a, rank)
        return dataclasses.replace(ref, A=ak, B=bk), "knots", captured_energy(s, rank)
    if path == "factored":
        coefs = linear_coefficients(method, len(layers), params)
        b, a = stack_factors([x.B for x in layers], [x.A for x in layers], coefs)  # (m, K), (K, n)
        if combine == "cat":
            return dataclasses.replace(ref, A=a, B=b), "factored", 1.0
        if combine == "full":
            return ref.to_weight(b @ a), "factored", 1.0
        bk, ak, s = truncate_factored(b, a, rank)
        return dataclasses.replace(ref, A=ak, B=bk), "factored", captured_energy(s, rank)
    dense = merge_dense(method, layers, params, seed=seed)
    if combine == "full":
        return dense, "dense", 1.0
    bk, ak, s = truncate_dense(_to2d(ref, dense), rank)
    return dataclasses.replace(ref, A=ak, B=bk), "dense", captured_energy(s, rank)


@contextlib.contextmanager
def in_module(module: str) -> Iterator[None]:
    """MergeErrors raised inside name `module`."""
    try:
        yield
    except MergeError as exc:
        raise type(exc)(f"module {module}: {exc}") from None


def merge_module(module: str, method: str, layers: list[LoraLayer], params: Mapping[str, Any], combine: Combine,
                 rank: int | None, seed: int | None, align: str | None) -> tuple[LoraLayer | torch.Tensor, str, float]:
    """One module's merge, as merge_lora_layers makes it: (LoraLayer, or the dense update for "full"),
    the path taken ("knots", "factored", "dense") and the share of the update's energy kept."""
    with in_module(module):
        return _one_module(method, layers, params, combine, rank, seed, align)


def check_options(combine: Combine, rank: int | None, align: str | None) -> None:
    if align not in (None, "knots"):
        raise MergeError(f"align must be None or 'knots', got {align!r}")
    if combine == "svd" and (rank is None or rank < 1):
        raise MergeError("an adapter output needs `rank: R` (R >= 1) or `combine: cat`")


def module_groups(adapters: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
                  params_for: Callable[[str, list[int]], Mapping[str, Any]] | None) -> Iterator[tuple]:
    """(module, indices of the adapters that adapt it, their entries, its parameters) for every module of
    the adapters (module -> LoraLayer or peft_format.FactorSpec), in sorted order; MergeError where the
    adapters' updates of a module differ in shape or layout."""
    modules = sorted({m for ad in adapters for m in ad})
    for module in modules:
        idx = [i for i, ad in enumerate(adapters) if module in ad]
        entries = [adapters[i][module] for i in idx]
        shapes = {x.weight_shape for x in entries}
        if len(shapes) > 1 or len({x.layout for x in entries}) > 1:
            raise MergeError(f"module {module}: the adapters' updates have shapes {sorted(shapes)}; "
                             "they were trained on different base models and cannot be merged")
        yield module, idx, entries, (params_for(module, idx) if params_for else _slice(params, idx, len(adapters)))


def merge_lora_layers(method: str, adapters: Sequence[Mapping[str, LoraLayer]], *, combine: Combine = "svd",
                      rank: int | None = None, seed: int | None = None, align: str | None = None,
                      params_for: Callable[[str, list[int]], Mapping[str, Any]] | None = None,
                      **params: Any) -> tuple[dict[str, LoraLayer | torch.Tensor], list[LayerReport]]:
    """Merge the layers of several adapters module by module, in memory (state-dict level).

    Each module is merged over the adapters that adapt it (the union of target
    modules); which ones is in the report. Adapter folders are merged through the
    engine instead (lora.adapter_run), one module at a time, with these numbers.

    Args:
        adapters: per adapter, module name -> LoraLayer (see peft_format.read_adapter).
        method: any mergelab method; the updates are its inputs (task vectors over a zero base).
        combine: "svd" (best rank-`rank` approximation), "cat" (exact concatenation,
            linear-type methods only) or "full" (dense update in the weight's shape).
        rank: R for combine="svd".
        align: None, or "knots": merge in the adapters' shared SVD basis (merge_knots).
        params_for: (module, adapter indices) -> parameters for that module; default: `params`
            (scalars, or one value per adapter, sliced to the adapters that have the module).

    Returns:
        (module -> LoraLayer, or dense update tensor for "full"), per-module reports.
    """
    check_options(combine, rank, align)
    out: dict[str, LoraLayer | torch.Tensor] = {}
    reports = []
    for module, idx, layers, p in module_groups(adapters, params, params_for):
        result, path, energy = merge_module(module, method, layers, p, combine, rank, seed, align)
        out[module] = result
        reports.append(LayerReport(module, idx, path, result.rank if isinstance(result, LoraLayer) else 0, energy))
    return out, reports


def _slice(params: Mapping[str, Any], idx: list[int], n: int) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise MergeError(f"parameter {k!r} has {len(v)} values for {n} adapters")
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out
