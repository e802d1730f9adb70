"""PCB-merging: parameter competition balancing (Du et al., NeurIPS 2024, arXiv:2410.02396)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mergelab.methods.registry import MethodParams, PerModel, merge_method
from mergelab.methods.task_arithmetic import add_to_base, check_inputs


class PcbShared(MethodParams):
    """Shared parameters of pcb."""

    pcb_ratio: float = Field(
        0.1, gt=0, le=1, description="share of each task's entries kept (the authors' name and default)"
    )
    lambda_: float = Field(
        1.0, alias="lambda", description="scale of the merged task vector before it is added to the base"
    )


def min_max(v: Tensor) -> Tensor:
    """(v - min v) / (max v - min v) over all entries; 0 everywhere when v is constant."""
    lo, hi = v.min(), v.max()
    span = hi - lo
    return (v - lo) / span if float(span) > 0 else torch.zeros_like(v)


def balance(taus: Tensor) -> Tensor:
    """beta_i = softmax(N norm(tau_i^2)) * sum_j softmax(N norm(tau_i tau_j)), each softmax over all entries.

    taus (N, d) flattened task vectors; returns (N, d).
    """
    n = len(taus)

    def soft(v: Tensor) -> Tensor:
        return torch.softmax(n * min_max(v), dim=0)

    betas = []
    for tau_i in taus:
        inter = sum(soft(tau_i * tau_j) for tau_j in taus)  # (d,)
        betas.append(soft(tau_i * tau_i) * inter)
    return torch.stack(betas)


def keep_top(betas: Tensor, ratio: float) -> Tensor:
    """(N, d) mask of each row's k = d - int(d (1 - ratio)) largest entries (ties at the k-th value kept)."""
    d = betas.shape[1]
    k = max(1, d - int(d * (1 - ratio)))
    kth = betas.topk(k, dim=1).values[:, -1:]  # (N, 1)
    return betas >= kth


@merge_method("pcb", shared_params=PcbShared, base="required")
def pcb(x: Tensor, base: Tensor, p: PerModel, s: PcbShared, gen=None) -> Tensor:
    """PCB-merging: weight each task's entries by their importance within and across tasks, drop the rest.

    tau_i = theta_i - theta_base, flattened per tensor; norm(v) = (v - min v) / (max v - min v);
    softmax over the tensor's entries:
        beta_intra_i = softmax(N norm(tau_i * tau_i)),
        beta_inter_i = sum_j softmax(N norm(tau_i * tau_j)),
        beta_i = beta_intra_i * beta_inter_i,
        m_i = 1 on the top pcb_ratio of beta_i's entries (k = d - int(d (1 - pcb_ratio)) of d;
              ties with the k-th value kept), 0 elsewhere,
        theta = theta_base + lambda * sum_i m_i beta_i tau_i / sum_i m_i beta_i  (0 where no task keeps it).
    Du et al., 2024, "Parameter Competition Balancing for
    Model Merging", NeurIPS 2024, arXiv:2410.02396 (the paper's equations).

    Parameters (shared): pcb_ratio (0.1, the name and default of the authors' PCB_merge), lambda
    (1.0). No per-model parameters. FusionBench 0.2.33 has no PCB; tests/methods/test_pcb.py checks
    against a loop-by-loop numpy computation. Not elementwise: norms and softmaxes run over a whole
    tensor (O(N^2 d) time, O(N d) memory).
    Differences from the authors' code (duguodong7/pcb-merging, PCB_merge): they flatten the whole model
    into one vector per task (mergelab balances tensor by tensor); they clip |tau| at its 0.01% and
    99.99% quantiles first; their inter-balancing is tanh(tau_i * sum_j tau_j), not a sum of softmaxes;
    they take exp(N norm(|tau_i|)^2) for the intra term (a softmax up to a per-task factor) and min-max
    normalise the kept beta_i per task, so the weakest kept entry gets weight 0.

    Args:
        x: (N, *shape) fine-tuned tensors, any shape (flattened inside); base: (*shape);
        p: one NoParams per row of x; s: PcbShared; gen: unused (no randomness).

    Returns:
        (*shape) the merged weights, base where no task keeps an entry.
    """
    check_inputs("pcb", x, base, p)
    taus = (x - base).reshape(len(x), -1)  # (N, d)
    betas = balance(taus)
    weights = betas * keep_top(betas, s.pcb_ratio)  # (N, d) m_i beta_i
    total = weights.sum(0)
    safe = total.clamp_min(torch.finfo(total.dtype).tiny)  # 0 / 0 never computed: those entries take 0
    merged = torch.where(total > 0, (weights * taus).sum(0) / safe, 0.0)
    return add_to_base(base, merged.reshape(base.shape), s.lambda_)
