"""DiLoCo's outer step on a fragment: on its flat buffers where that is exactly SGD's step, else outer.step()."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from mergelab.distributed.flat import flat_sgd_begin, flat_sgd_end, flat_sgd_range, flat_sgd_supported


def copy_all(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """dst[i] <- src[i] for every i, in one call."""
    torch._foreach_copy_([t.data for t in dst], list(src))


def flat_step_hyper(outer: torch.optim.Optimizer, params: Sequence[Tensor], theta: Tensor | None,
                    grad: Tensor | None) -> dict | None:
    """SGD's hyperparameters when the outer step can run on the flat buffers (flat.py): theta and the
    reduced pseudo-gradient flat buffers of one dtype and device, an outer optimizer flat_sgd_step
    reproduces exactly, and momentum buffers present for all of the parameters or none."""
    if theta is None or grad is None or theta.dtype != grad.dtype or theta.device != grad.device:
        return None
    hyper = flat_sgd_supported(outer, params)
    if hyper is None or hyper["momentum"] == 0:
        return hyper
    have = [p in outer.state and outer.state[p].get("momentum_buffer") is not None for p in params]
    return hyper if all(have) or not any(have) else None


def run_flat_step(outer: torch.optim.Optimizer, hyper: dict, params: Sequence[Tensor], theta: Tensor,
                  theta_views: Sequence[Tensor], merged: Iterable[tuple[list[int], Tensor]], count: int,
                  momentum: tuple[Tensor, list[Tensor]], alpha: float) -> None:
    """The outer SGD step on the flat buffers, writing the new theta into the model in the same pass,
    bucket by bucket, each as soon as its all-reduce is done (the next ones still running)."""
    mom, mom_views = momentum
    first = flat_sgd_begin(outer, hyper, params, mom_views)
    offset = 0
    for idx, summed in merged:
        n = summed.numel()
        flat_sgd_range(hyper, [params[i] for i in idx], theta[offset:offset + n], summed, count,
                       mom[offset:offset + n] if mom.numel() else mom, first, write_params=alpha == 0)
        offset += n
    flat_sgd_end(outer, hyper, params, mom_views)
    if alpha > 0:  # p <- lerp(theta, p, alpha), as the generic path computes it
        for p, b in zip(params, theta_views):
            torch.lerp(b, p, alpha, out=p.data)
    for p in params:
        p.grad = None  # as outer.zero_grad() leaves them on the generic path


def outer_step(outer: torch.optim.Optimizer, frag: Sequence[tuple[str, Tensor]], merged: Sequence[Tensor]) -> None:
    """outer.step() with the pseudo-gradient as the fragment's gradients (other parameters untouched)."""
    in_frag = {id(p) for _, p in frag}
    stash = {}
    for group in outer.param_groups:  # a single outer optimizer must step this fragment only
        for p in group["params"]:
            if id(p) not in in_frag:
                stash[p], p.grad = p.grad, None
    for (_, p), g in zip(frag, merged):
        p.grad = g.to(p.device, p.dtype)
    with torch.enable_grad():
        outer.step()
    outer.zero_grad()
    for p, g in stash.items():
        p.grad = g
