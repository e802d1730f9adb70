"""Flat buffers for the plain-mean DiLoCo sync, and torch's SGD step applied to them.

A sync of a fragment touches every value of the fragment a handful of times:
the pseudo-gradient theta - theta_i, its sum over workers, the outer step and
the copy of the new theta into the model. On a CPU that is memory-bandwidth
work, and it costs more than it needs to when each pass allocates (fresh
pages are zero-filled on first touch) or goes tensor by tensor through small
kernels. Here the global parameters theta (DiLoCo's backup), the outer
optimizer's momentum and the pseudo-gradient are each one flat contiguous
buffer per fragment, allocated once; the per-tensor objects the rest of the
code sees (the backups, SGD's `momentum_buffer` state) are views into them.

`flat_sgd_step` applies exactly what `torch.optim.SGD.step()` computes (torch
2.x, `_single_tensor_sgd`): with g the gradient, theta the parameters, mu the
momentum, tau the dampening, lambda the weight decay and gamma the lr,

    g <- -g                       if maximize
    g <- g + lambda theta         if lambda != 0
    b <- g (first step), else b <- mu b + (1 - tau) g      if mu != 0
    g <- g + mu b  (Nesterov), else g <- b                  if mu != 0
    theta <- theta - gamma g

as the same elementwise torch operations in the same order, on the flat
buffers instead of tensor by tensor, so the result is bit for bit the same
(tests/distributed/test_flat_sgd.py checks it against SGD.step()). The only
difference is that the gradient buffer is overwritten (SGD allocates new
tensors for g + lambda theta and g + mu b). Anything else (another optimizer,
an SGD subclass, fused/differentiable SGD, step hooks, tensor lr, different
hyperparameters among the fragment's parameter groups) is left to the
optimizer's own step(): `flat_sgd_supported` says which.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def flat_views(like: Sequence[Tensor], *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, pin: bool = False) -> tuple[Tensor, list[Tensor]]:
    """One zero-initialised flat buffer holding len(like) tensors, and a view shaped like each."""
    dtype = dtype or like[0].dtype
    device = torch.device(device) if device is not None else like[0].device
    flat = torch.zeros(sum(t.numel() for t in like), dtype=dtype, device=device)
    if pin:
        flat = flat.pin_memory()
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return flat, views


def flat_sgd_supported(outer: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict | None:
    """The hyperparameters `flat_sgd_step` would use for `params`, or None when it cannot reproduce
    `outer.step()` exactly (see module doc)."""
    if type(outer) is not torch.optim.SGD:
        return None
    if outer._optimizer_step_pre_hooks or outer._optimizer_step_post_hooks:
        return None
    from torch.optim import optimizer as _opt_mod

    if getattr(_opt_mod, "_global_optimizer_pre_hooks", None) or getattr(_opt_mod, "_global_optimizer_post_hooks",
                                                                         None):
        return None
    wanted = {id(p) for p in params}
    found, hyper = 0, None
    for group in outer.param_groups:
        ids = {id(p) for p in group["params"]}
        if not ids & wanted:
            continue
        found += len(ids & wanted)
        if group.get("fused") or group.get("differentiable") or isinstance(group["lr"], Tensor):
            return None
        h = {k: group[k] for k in _HYPER}
        if any(isinstance(v, Tensor) for v in h.values()):
            return None
        if hyper is not None and h != hyper:
            return None
        hyper = h
    return hyper if found == len(wanted) else None


def flat_sgd_step(outer: torch.optim.SGD, hyper: dict, params: Sequence[Tensor], theta: Tensor,
                  grad: Tensor, momentum: Tensor, momentum_views: Sequence[Tensor]) -> None:
    """SGD's update of `params` (whose global values are the flat `theta`) with the flat `grad`
    (overwritten), keeping SGD's per-parameter momentum state as views of the flat `momentum`."""
    lr, mu, damp, wd = hyper["lr"], hyper["momentum"], hyper["dampening"], hyper["weight_decay"]
    if hyper["maximize"]:
        grad.neg_()
    if wd != 0:
        grad.add_(theta, alpha=wd)
    if mu != 0:
        bufs = [outer.state[p].get("momentum_buffer") if p in outer.state else None for p in params]
        if all(b is None for b in bufs):  # SGD's first step: b = g
            momentum.copy_(grad)
        else:
            for b, v in zip(bufs, momentum_views):  # a loaded or fresh state: bring it into the flat buffer
                if b is None:
                    raise RuntimeError("SGD momentum state exists for some parameters of a fragment only")
                if b.data_ptr() != v.data_ptr():
                    v.copy_(b)
            momentum.mul_(mu).add_(grad, alpha=1 - damp)
        for p, v in zip(params, momentum_views):
            outer.state[p]["momentum_buffer"] = v
        if hyper["nesterov"]:
            grad.add_(momentum, alpha=mu)
            theta.add_(grad, alpha=-lr)
        else:
            theta.add_(momentum, alpha=-lr)
    else:
        theta.add_(grad, alpha=-lr)
