"""WUDI merging: the merged task vector that least disturbs each task's own inputs.

Cheng, Lyu, Yu, Zhang, Zhu et al., 2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", arXiv:2503.08099.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mergelab.methods.registry import MethodParams, NoParams, PerModel, merge_method
from mergelab.methods.task_arithmetic import add_to_base, check_inputs


class WudiShared(MethodParams):
    """Shared parameters of wudi (defaults: FusionBench's WUDIMerging)."""

    iterations: int = Field(300, ge=0, description="Adam steps per 2-D tensor")
    lr: float = Field(1e-5, gt=0, description="Adam's learning rate")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")


def interference(tau: Tensor, taus: Tensor, sq_norms: Tensor, grams: Tensor | None = None) -> Tensor:
    """sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 for tau (out, in), taus (N, out, in).

    With `grams` (N, in, in) = tau_i^T tau_i the same sum is taken as sum_i <D_i G_i, D_i> / n_i,
    D_i = tau - tau_i: N out in^2 flops and (N, out, in) memory instead of N out^2 in and (N, out, out),
    which is what a tall matrix (an embedding, out = vocabulary) needs.
    """
    d = tau.unsqueeze(0) - taus  # (N, out, in)
    if grams is not None:
        return ((torch.matmul(d, grams) * d).sum((1, 2)) / sq_norms).sum()
    product = torch.matmul(d, taus.transpose(1, 2))  # (N, out, out)
    return (product.square() / sq_norms.view(-1, 1, 1)).sum()


@merge_method("wudi", shared_params=WudiShared, base="required")
def wudi(x: Tensor, base: Tensor, p: PerModel[NoParams], s: WudiShared, gen=None) -> Tensor:
    """WUDI: minimise each task's interference with the merged task vector, by gradient descent.

    For a 2-D weight, with tau_i = theta_i - theta_base (out, in):

        tau* = argmin_tau  sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2,

    started from sum_i tau_i and run for `iterations` Adam steps (torch.optim.Adam, no weight
    decay); theta = theta_base + lambda * tau*. The rows of tau_i stand in for the task's inputs (the
    paper shows they span them), so the loss is each task's output change on its own inputs. Other
    tensors (biases, norms: not 2-D) take the mean of the task vectors, sum_i tau_i / N.
    Cheng et al., 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
    Merging via Task Vectors", arXiv:2503.08099.

    Shared: iterations (300), lr (1e-5), lambda (1.0): FusionBench's WUDIMerging defaults (it has no
    lambda; 1.0 is its merge). Not elementwise: each step multiplies N (out, in) by (in, out)
    matrices, so a tensor costs about 6 N out in min(out, in) flops per iteration (forward and
    backward; a tall matrix such as an embedding takes the loss through tau_i^T tau_i instead, equal
    in exact arithmetic, where FusionBench forms the (N, out, out) products) — on a 7B model hours
    on a CPU; run it with `--device cuda` there. Runs on x's device, in float32.
    FusionBench 0.2.33 gives the same tensors to float32 rounding (tests/fusionbench/test_datafree.py);
    its exclude_keys option (tensors that take the mean) has no counterpart: all 2-D tensors are optimised.

    Args:
        x: (N, *shape) the fine-tuned models' tensors.
        base: (*shape) the base model's tensor.
        p: unused (no per-model parameters).
        s: shared parameters.
        gen: unused (deterministic).

    Returns:
        (*shape) the merged weights.
    """
    check_inputs("wudi", x, base, p)
    taus = x - base  # (N, *shape)
    if taus.dim() != 3 or s.iterations == 0:
        merged = taus.sum(0) if taus.dim() == 3 else taus.mean(0)
        return add_to_base(base, merged, s.lambda_)
    sq_norms = taus.reshape(len(taus), -1).square().sum(1)  # (N,)
    # A tall matrix takes the loss through tau_i^T tau_i (equal in exact arithmetic, not in rounding).
    grams = torch.matmul(taus.transpose(1, 2), taus) if taus.shape[1] > taus.shape[2] else None
    tau = torch.nn.Parameter(taus.sum(0))
    opt = torch.optim.Adam([tau], lr=s.lr, weight_decay=0)
    with torch.enable_grad():
        for _ in range(s.iterations):
            loss = interference(tau, taus, sq_norms, grams)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return add_to_base(base, tau.detach().clone(), s.lambda_)
