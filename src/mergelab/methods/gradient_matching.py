"""Gradient matching: task vectors merged under each task's curvature, with a prior at the base.

A member of the metric-mean family of preconditioned.py (it shares its metric checks), in a
module of its own; methods/__init__.py imports it right after preconditioned, so the registry
lists it where it always was.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mergelab.errors import MergeError
from mergelab.methods.preconditioned import _view, check_metrics, floor_metrics
from mergelab.methods.registry import MethodParams, PerModel, merge_method


class GradientMatchingParams(MethodParams):
    """Per-model parameters of `gradient_matching`."""

    weight: float = Field(1.0, ge=0, description="a_t, this task's scale")
    stats_scale: float = Field(1.0, ge=0, description=(
        "multiplies this model's metric: H_t = stats_scale x stats (the authors use the example count)"))


class GradientMatchingShared(MethodParams):
    """Shared parameters of `gradient_matching`."""

    h0: float = Field(0.0, ge=0, description="scalar prior precision added to H_0 (the authors' delta_0)")
    prior_weight: float = Field(1.0, ge=0, description="scale of the base model's metric in H_0")
    epsilon: float = Field(1e-12, gt=0, description="floor on H_0 + sum_t a_t H_t")


@merge_method("gradient_matching", model_params=GradientMatchingParams, shared_params=GradientMatchingShared,
              base="required", elementwise=True, needs_stats=True, uses_base_stats=True)
def gradient_matching(x: Tensor, base: Tensor, p: PerModel[GradientMatchingParams], s: GradientMatchingShared,
                      gen=None, *, stats: Tensor | None = None, base_stats: Tensor | None = None) -> Tensor:
    """Uncertainty-based gradient matching: task arithmetic with Hessian-weighted task vectors.

    theta = theta_0 + Hbar^-1 sum_t a_t (H_0 + H_t) tau_t,  Hbar = H_0 + sum_t a_t H_t,
    tau_t = theta_t - theta_0, all H diagonal (squared-gradient Fisher).
    H_t = stats_scale_t x stats_t; H_0 = prior_weight x base_stats + h0, the
    scalar h0 alone when the base has no statistics.
    Daheim, Moellenhoff, Ponti, Gurevych, Khan, 2024, "Model Merging by
    Uncertainty-Based Gradient Matching", arXiv:2310.12808.

    Special cases: H_t = 0 with H_0 = h0 > 0 is task arithmetic theta_0 + sum_t
    a_t tau_t; H_0 = H_t = I with sum_t a_t = 1 is too (the weighted average of
    the models); H_0 = 0 is Fisher merging of the task models.

    Per-model parameters: weight (1.0) a_t, stats_scale (1.0). Shared: h0 (0.0,
    the authors' default delta_0), prior_weight (1.0), epsilon (1e-12, floor
    on Hbar with a warning: where every H is zero the base value is kept).

    Args:
        x: (N, *shape) the task models' tensors.
        base: (*shape) the base model's tensor theta_0.
        p: per-model parameters, one per row of x.
        s: shared parameters.
        gen: unused.
        stats: (N, *shape) the task models' diagonal metrics.
        base_stats: (*shape) the base model's diagonal metric, or None.

    Returns:
        (*shape) the merged tensor.
    """
    if base is None:
        raise MergeError("gradient_matching adds task vectors to a base model: set `base_model:` in the recipe")
    if len(p) != x.shape[0]:
        raise MergeError(f"gradient_matching got {x.shape[0]} models but {len(p)} parameter sets")
    a = p.tensor("weight", like=x)  # (N,)
    h = check_metrics("gradient_matching", x, stats) * _view(p.tensor("stats_scale", like=x), x)  # (N, *shape)
    h0 = torch.full_like(base, s.h0)
    if base_stats is not None:
        h0 = h0 + s.prior_weight * check_metrics("gradient_matching", base.unsqueeze(0),
                                                 base_stats.unsqueeze(0), what="base metric")[0]
    hbar = h0 + (_view(a, h) * h).sum(0)  # (*shape)
    hbar = floor_metrics("gradient_matching", hbar.unsqueeze(0), s.epsilon, what="H_0 + sum_t a_t H_t")[0]
    tau = x - base  # (N, *shape)
    num = (_view(a, h) * (h0 + h) * tau).sum(0)
    return base + num / hbar
