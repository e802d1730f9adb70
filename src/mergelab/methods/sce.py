"""SCE (select, calculate, erase): FuseChat's merge of task vectors by variance and energy."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mergelab.methods.registry import MethodParams, PerModel, merge_method
from mergelab.methods.primitives import weights_from_squares  # noqa: F401  (defined beside the kernels' helpers)
from mergelab.methods.kernels import lazy_kernel
from mergelab.methods.consensus import disjoint_mean, elect_sign
from mergelab.methods.task_arithmetic import check_inputs
from mergelab.methods.trim import keep_count, top_k_mask


class SceShared(MethodParams):
    """Shared parameters of sce."""

    select_topk: float = Field(1.0, ge=0, le=1, description="share of entries kept, by variance across models")
    int8_mask: bool = Field(False, description="MergeKit's memory option for its masks; no numerical effect")


_BLOCK = 1 << 20  # entries per float64 partial sum


def keep_top_variance(task_vectors: Tensor, share: float) -> Tensor:
    """(*shape) bool mask of the entries whose task vectors vary most across models.

    Keeps keep_count(share, #entries with nonzero variance) entries of largest
    population variance (ties: lower index).
    """
    var = task_vectors.var(dim=0, unbiased=False)  # (*shape)
    return top_k_mask(var, keep_count(share, int(torch.count_nonzero(var))))


def sce_weights(task_vectors: Tensor) -> Tensor:
    """(N,) eta_i = mean(tau_i^2) / sum_j mean(tau_j^2), summed in float64; uniform when every tau_i is zero."""
    squares = []
    for t in task_vectors:
        flat = t.reshape(-1)
        squares.append(sum(float(torch.linalg.vector_norm(flat[i:i + _BLOCK], dtype=torch.float64) ** 2)
                           for i in range(0, flat.numel(), _BLOCK)))
    return weights_from_squares(squares, task_vectors[0].numel()).to(task_vectors.dtype)


@merge_method("sce", shared_params=SceShared, base="required", kernel=lazy_kernel("sce"))
def sce(x: Tensor, base: Tensor, p: PerModel, s: SceShared, gen=None) -> Tensor:
    """SCE: select entries by variance, calculate weights, erase sign conflicts.

    tau_i = (theta_i - theta_base) * M, M = top select_topk share of entries by
    Var_i(tau_i); s = sign(sum_i tau_i); eta_i = mean(tau_i^2) / sum_j mean(tau_j^2);
    theta = theta_base + sum_i eta_i tau_i [sign tau_i = s] / sum_i eta_i [sign tau_i = s].
    Wan, Zhong, Yang, Chen, Quan, 2024, "FuseChat: Knowledge Fusion of Chat Models",
    arXiv:2408.07990.

    Shared parameters: select_topk (1.0, in [0, 1]; 1 keeps every entry);
    int8_mask (False; no numerical effect). No per-model parameters.

    Args:
        x: (N, *shape) the fine-tuned models' tensors.
        base: (*shape) the base model's tensor.
        p: per-model parameters (none), one per row of x.
        s: shared parameters.
        gen: unused (the method is deterministic).

    Returns:
        (*shape) the merged weights.
    """
    check_inputs("sce", x, base, p)
    tv = x - base  # (N, *shape), ours to modify
    if s.select_topk < 1:
        tv.mul_(keep_top_variance(tv, s.select_topk))
    sign = elect_sign(tv)  # elected before weighting, as MergeKit does
    weights = sce_weights(tv)
    for w, row in zip(weights.tolist(), tv):
        row.mul_(w)
    return base + disjoint_mean(tv, sign, weights, normalize=True)
