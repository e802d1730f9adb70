"""Reinforced Agent Merging: average what several fine-tunes changed, keep what only one changed.

ram and ramplus_tl, with MergeKit 0.1.5's names, parameters and defaults.
Both split every entry of the task vectors tau_i = theta_i - theta_base by how
many models changed it (|tau_i| > epsilon): unchanged (0), unique (1) or
shared (2 or more).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mergelab.methods.registry import MethodParams, merge_method


class RamShared(MethodParams):
    epsilon: float = Field(1e-5, ge=0, description="a task-vector entry counts as changed when |tau| > epsilon")


class RamPlusShared(RamShared):
    r: float = Field(0.1, description="strength of the rescaling of unique entries")
    alpha: float = Field(0.2, description="cap on the shared/unique ratio rho")


def split_changes(x: Tensor, base: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """(tau, changed, count) for the task vectors of x against base.

    tau (N, M): flattened task vectors, zeroed where |tau| <= epsilon;
    changed (N, M) bool: |tau_i| > epsilon;  count (1, M): how many models changed each entry.
    """
    n = x.shape[0]
    tau = (x - base).reshape(n, -1)  # (N, M)
    changed = tau.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)  # (1, M)
    return tau * changed, changed, count


def _averaged_shared(tau: Tensor, count: Tensor) -> Tensor:
    """tau_i / n on entries several models changed, 0 elsewhere: (N, M).

    Divided (not multiplied by 1/n) so the rounding is MergeKit's.
    """
    return tau * (count > 1) / count.clamp(min=1)


# Each output entry of ram depends on that entry's inputs only, so the engine may merge big tensors in
# row chunks; ramplus_tl counts over the whole tensor and may not.
@merge_method("ram", shared_params=RamShared, base="required", elementwise=True)
def ram(x: Tensor, base: Tensor, p, s: RamShared, gen=None) -> Tensor:
    """Reinforced Agent Merging (RAM): keep unique changes whole, average shared ones.

    tau_i = theta_i - theta_base, c_i = [|tau_i| > epsilon], n = sum_i c_i (per entry);
    theta = theta_base + sum_i c_i tau_i * ([n = 1] + [n > 1] / n).
    An entry changed by one model takes that model's change undiluted; an entry changed
    by several takes the mean of their changes; an unchanged entry stays at the base.

    Yuan et al. 2026, "Behavior Knowledge Merge in Reinforced Agentic Models",
    arXiv:2601.13572 (RAM); as MergeKit 0.1.5's `ram`.

    Args:
        epsilon (shared, default 1e-5): threshold above which |tau| counts as a change.

    x: (N, *shape) fine-tuned models; base: (*shape); returns (*shape).
    """
    tau, _, count = split_changes(x, base, s.epsilon)
    merged = (tau * (count == 1) + _averaged_shared(tau, count)).sum(dim=0)  # (M,)
    return base + merged.reshape(base.shape)


@merge_method("ramplus_tl", shared_params=RamPlusShared, base="required")
def ramplus_tl(x: Tensor, base: Tensor, p, s: RamPlusShared, gen=None) -> Tensor:
    """RAM+ (tensor-local): RAM with each model's unique changes scaled up by its overlap ratio.

    With c_i, n as in `ram`, per model i over this tensor's entries:
    rho_i = #{c_i and n > 1} / max(#{c_i and n = 1}, epsilon),
    lambda_i = 1 + r * clamp(rho_i, 0, alpha),
    theta = theta_base + sum_i c_i tau_i * (lambda_i [n = 1] + [n > 1] / n).
    A model whose changes are mostly shared would lose most of its update to averaging;
    rescaling its unique entries compensates for that dilution.

    Yuan et al. 2026, "Behavior Knowledge Merge in Reinforced Agentic Models",
    arXiv:2601.13572 (RAM+). "Tensor-local" (MergeKit 0.1.5's `ramplus_tl`): rho_i is counted
    within each tensor, not over the whole model.

    Args:
        r (shared, default 0.1): rescaling strength.
        alpha (shared, default 0.2): cap on rho_i.
        epsilon (shared, default 1e-5): change threshold, and floor of the unique count.

    x: (N, *shape) fine-tuned models; base: (*shape); returns (*shape).
    """
    tau, changed, count = split_changes(x, base, s.epsilon)
    unique = count == 1  # (1, M)
    n_shared = (changed & (count > 1)).sum(dim=1)  # (N,)
    n_unique = (changed & unique).sum(dim=1)  # (N,)
    rho = n_shared / n_unique.clamp(min=s.epsilon)
    lam = 1 + s.r * rho.clamp(min=0, max=s.alpha)  # (N,)
    merged = (tau * unique * lam.to(tau.dtype).unsqueeze(-1) + _averaged_shared(tau, count)).sum(dim=0)  # (M,)
    return base + merged.reshape(base.shape)


__all__ = ["ram", "ramplus_tl", "split_changes"]
