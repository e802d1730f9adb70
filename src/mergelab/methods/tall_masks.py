"""TALL masks and consensus merging (Wang et al., ICML 2024, arXiv:2405.07813).

Each task's mask marks the entries where its task vector matters more than what the other tasks
add there; the consensus merge keeps the multi-task vector where at least k tasks' masks agree.
The masks go beside the merged model (SideOutputs, task_models.py), so that each task's model
theta_base + tau_MTL * mask_t (the paper's compression, FusionBench's TallMaskTaskArithmetic) can
be rebuilt from the merged one.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mergelab.methods.bitmask import pack_masks, unpack_mask
from mergelab.methods.registry import MethodParams, PerModel, SideOutputs, merge_method
from mergelab.methods.task_arithmetic import check_inputs


class TallMasksShared(MethodParams):
    """Shared parameters of tall_masks (FusionBench's names and its config's default lambda)."""

    tall_mask_lambda: float = Field(0.6, ge=0, description="mask_t = |tau_t| > tall_mask_lambda * |tau_MTL - tau_t|")
    prun_thre_k: int = Field(2, ge=0, description="consensus: keep entries where at least this many tasks' masks "
                             "are set (2: consensus TA; 0: plain task arithmetic)")
    lambda_: float = Field(1.0, gt=0, alias="lambda", description="scale of the consensus-masked multi-task vector")


def task_masks(tau: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """(masks (N, *shape) bool, tau_MTL (*shape)) of task vectors tau (N, *shape):
    tau_MTL = sum_t tau_t, mask_t = |tau_t| > lam * |tau_MTL - tau_t|."""
    mtl = tau.sum(0)
    return tau.abs() > (mtl - tau).abs() * lam, mtl


def _tall_side(x: Tensor, base: Tensor, p: PerModel, s: TallMasksShared, merged: Tensor) -> dict[str, Tensor]:
    """Per tensor: the masks (bit-packed) and `rest`, tau_MTL where some mask is set but the consensus is
    not (the merged model lacks those entries), in flattened order."""
    masks, mtl = task_masks(x - base, s.tall_mask_lambda)
    count = masks.sum(0)
    lost = (count > 0) & (count < s.prun_thre_k)
    return {"masks": pack_masks(masks), "rest": mtl[lost].float()}


def _tall_rebuild(merged: Tensor, base: Tensor, side: dict[str, Tensor], meta: dict, task: int) -> Tensor:
    """theta_task = theta_base + tau_MTL * mask_task, with tau_MTL = (merged - theta_base) / lambda where
    the consensus holds and the stored `rest` where it does not."""
    shape = tuple(merged.shape)
    masks = torch.stack([unpack_mask(row, shape) for row in side["masks"]]).to(merged.device)
    params = meta["params"]
    count = masks.sum(0)
    keep = count >= params["prun_thre_k"]
    mtl = torch.where(keep, (merged - base) / params["lambda"], 0.0)
    mtl[(count > 0) & ~keep] = side["rest"].to(merged.device)
    return base + mtl * masks[task]


TALL_SIDE = SideOutputs(tensor_fn=_tall_side, summary_fn=lambda side, s: {}, rebuild_fn=_tall_rebuild)


@merge_method("tall_masks", shared_params=TallMasksShared, base="required", min_models=1, side_outputs=TALL_SIDE)
def tall_masks(x: Tensor, base: Tensor | None, p: PerModel, s: TallMasksShared, gen=None) -> Tensor:
    """TALL masks / consensus merging (Wang et al., ICML 2024, arXiv:2405.07813).

    tau_t = theta_t - theta_base, tau_MTL = sum_t tau_t,
    mask_t = |tau_t| > tall_mask_lambda * |tau_MTL - tau_t|,
    consensus = (sum_t mask_t >= prun_thre_k),
    theta = theta_base + lambda * tau_MTL * consensus.

    Parameters (shared): tall_mask_lambda (0.6, FusionBench's config), prun_thre_k (2: consensus TA,
    removing "selfish" and "catastrophic" entries; 1: only catastrophic ones; 0: task arithmetic),
    lambda (1.0; the paper tunes it on validation data).

    Beside the model (task_models.safetensors / .json) go each task's bit-packed mask and tau_MTL on
    the entries some mask keeps but the consensus drops, so that task t's model
    theta_base + tau_MTL * mask_t (FusionBench's TallMaskTaskArithmeticAlgorithm) is rebuilt by
    `mergelab.task_model` / `mergelab unmerge`, within the output dtype's rounding.

    Differences from FusionBench 0.2.33: the mask is the paper's, as FusionBench's
    tall_mask.utils.generate_task_masks computes it (strict >). TallMaskTaskArithmeticAlgorithm passes
    the pretrained weights to its mask function where theta_0's task vector (zeros) belongs, so it
    would compare |theta_0 - tau_t|; on a pool of nn.Modules it stops with a TypeError (Parameter minus
    Tensor); called with zeros, its mask function gives these masks (tests/fusionbench/test_masks.py).
    FusionBench has no consensus merge algorithm; the consensus is utils.construct_consensus_mask's
    count >= prun_thre_k.
    """
    check_inputs("tall_masks", x, base, p)
    masks, mtl = task_masks(x - base, s.tall_mask_lambda)
    return base + mtl * (masks.sum(0) >= s.prun_thre_k) * s.lambda_
