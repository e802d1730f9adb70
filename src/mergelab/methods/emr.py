"""EMR-Merging (Elect, Mask & Rescale; Huang et al., NeurIPS 2024, arXiv:2405.17461).

One unified task vector is elected from the task vectors; each task keeps a mask (where its task
vector agrees in sign with the unified one) and a rescaler, from which its own model is rebuilt:
theta_k = theta_base + tau_uni * mask_k * rescaler_k. The merged model written is the unified
one, theta_base + tau_uni; the masks and rescalers go beside it (SideOutputs, task_models.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergelab.methods.bitmask import pack_masks, unpack_mask
from mergelab.methods.kernels import lazy_kernel
from mergelab.methods.registry import PerModel, SideOutputs, merge_method
from mergelab.methods.task_arithmetic import check_inputs


def elect(tau: Tensor) -> tuple[Tensor, Tensor]:
    """(masks (N, *shape) bool, tau_uni (*shape)) of task vectors tau (N, *shape).

    gamma = sign(sum_i tau_i) with zeros counted as -1 (FusionBench's `_sign`);
    mask_i = tau_i * gamma > 0; tau_uni = gamma * max_i |tau_i * mask_i| (0 where no task agrees).
    """
    flag = torch.where(tau.sum(0) > 0, 1.0, -1.0).to(tau.dtype)
    masks = tau * flag > 0
    tau_uni = (tau.abs() * masks).amax(0) * flag
    return masks, tau_uni


def _emr_side(x: Tensor, base: Tensor, p: PerModel, s, merged: Tensor) -> dict[str, Tensor]:
    """Per tensor: masks (bit-packed), mean|tau_i| and mean|tau_uni * mask_i| (N,) for the rescalers."""
    tau = x - base
    masks, tau_uni = elect(tau)
    dims = tuple(range(1, tau.dim()))
    return {"masks": pack_masks(masks),
            "abs_task": tau.abs().mean(dim=dims) if dims else tau.abs(),
            "abs_uni": (tau_uni * masks).abs().mean(dim=dims) if dims else (tau_uni * masks).abs()}


def _emr_summary(side: dict[str, dict[str, Tensor]], s) -> dict:
    """rescalers: r_i = sum over tensors of mean|tau_i| / sum over tensors of mean|tau_uni * mask_i|."""
    parts = [t for t in side.values() if "abs_task" in t]
    if not parts:
        return {"rescalers": []}
    task = torch.stack([t["abs_task"].double() for t in parts]).sum(0)
    uni = torch.stack([t["abs_uni"].double() for t in parts]).sum(0)
    # tau_uni * mask_i is 0 everywhere when uni is 0: any rescaler rebuilds the same model.
    return {"rescalers": [a / b if b > 0 else 1.0 for a, b in zip(task.tolist(), uni.tolist())]}


def _emr_rebuild(merged: Tensor, base: Tensor, side: dict[str, Tensor], meta: dict, task: int) -> Tensor:
    """theta_task = theta_base + (merged - theta_base) * mask_task * rescaler_task."""
    mask = unpack_mask(side["masks"][task], tuple(merged.shape)).to(merged.device)
    return base + (merged - base) * mask * meta["summary"]["rescalers"][task]


EMR_SIDE = SideOutputs(tensor_fn=_emr_side, summary_fn=_emr_summary, rebuild_fn=_emr_rebuild)


@merge_method("emr", base="required", min_models=1, side_outputs=EMR_SIDE, kernel=lazy_kernel("emr"))
def emr(x: Tensor, base: Tensor | None, p: PerModel, s, gen=None) -> Tensor:
    """EMR-Merging (Huang et al., NeurIPS 2024, arXiv:2405.17461): the elected unified model.

    theta = theta_base + tau_uni, with tau_i = theta_i - theta_base,
    gamma = sign(sum_i tau_i) (zeros count as -1), mask_i = (tau_i * gamma > 0),
    tau_uni = gamma * max_i |tau_i * mask_i|.

    Beside the model (task_models.safetensors / .json) go each task's bit-packed mask and its
    rescaler r_i = sum_tensors mean|tau_i| / sum_tensors mean|tau_uni * mask_i| (one number per task,
    summed over all merged tensors, as FusionBench's `emr_merge`), so that task i's model is
    theta_i' = theta_base + tau_uni * mask_i * r_i (`mergelab.task_model`, `mergelab unmerge`).

    No parameters. As FusionBench 0.2.33 (EMRMerging); the rebuild takes tau_uni as
    merged - base from the written model, so it matches FusionBench within the output dtype's
    rounding (exact float32 rounding for a float32 output; write the merge in float32 to rebuild
    bfloat16 models without losing the task vectors' low bits). On the CPU one compiled pass makes the
    unified tensor, its masks and the rescalers' sums at once (methods/kernels/emr.py): the same
    tensors and masks, the rescalers within float32 rounding (float64 sums).
    """
    check_inputs("emr", x, base, p)
    _, tau_uni = elect(x - base)
    return base + tau_uni
