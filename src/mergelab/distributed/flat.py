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

import numpy as np
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
                  grad_sum: Tensor, count: int, momentum: Tensor, momentum_views: Sequence[Tensor], *,
                  write_params: bool = True) -> None:
    """SGD's update of `params`, whose global values are the flat `theta`, with the gradient
    grad_sum / count (grad_sum is overwritten); SGD's per-parameter momentum state is kept as views of
    the flat `momentum`. write_params: also set every parameter to its new global value.

    With numba (and mergelab's kernels on) this is one compiled pass over the buffers, the same
    floating-point operations as SGD's (divide, multiply, and torch's add-with-alpha as a fused
    multiply-add); else the torch operations SGD itself runs, on the flat buffers. Equivalent to
    flat_sgd_begin, flat_sgd_range over the whole buffers, flat_sgd_end."""
    first = flat_sgd_begin(outer, hyper, params, momentum_views)
    flat_sgd_range(hyper, params, theta, grad_sum, count, momentum, first, write_params=write_params)
    flat_sgd_end(outer, hyper, params, momentum_views)


def flat_sgd_begin(outer: torch.optim.SGD, hyper: dict, params: Sequence[Tensor],
                   momentum_views: Sequence[Tensor]) -> bool:
    """Bring SGD's momentum state of `params` into the flat buffer; True if this is SGD's first step."""
    if hyper["momentum"] == 0:
        return True
    bufs = [outer.state[p].get("momentum_buffer") if p in outer.state else None for p in params]
    if all(b is None for b in bufs):  # SGD's first step: b = g
        return True
    for b, v in zip(bufs, momentum_views):  # a loaded or fresh state: bring it into the flat buffer
        if b is None:
            raise RuntimeError("SGD momentum state exists for some parameters of a fragment only")
        if b.data_ptr() != v.data_ptr():
            v.copy_(b)
    return False


def flat_sgd_range(hyper: dict, params: Sequence[Tensor], theta: Tensor, grad_sum: Tensor, count: int,
                   momentum: Tensor, first: bool, *, write_params: bool = True) -> None:
    """The update of consecutive parameters `params` whose slices of the flat buffers are given
    (momentum may be empty when SGD has no momentum)."""
    kernel = _kernel(theta)
    if kernel is not None:
        _fused_step(kernel, hyper, params, theta, grad_sum, count, momentum, first, write_params)
    else:
        _torch_step(hyper, theta, grad_sum, count, momentum, first)
        if write_params:
            torch._foreach_copy_([p.data for p in params], _views(theta, params))


def flat_sgd_end(outer: torch.optim.SGD, hyper: dict, params: Sequence[Tensor],
                 momentum_views: Sequence[Tensor]) -> None:
    """SGD's state: each parameter's momentum_buffer is its view of the flat momentum."""
    if hyper["momentum"] != 0:
        for p, v in zip(params, momentum_views):
            outer.state[p]["momentum_buffer"] = v


def _views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def _torch_step(hyper: dict, theta: Tensor, grad: Tensor, count: int, momentum: Tensor, first: bool) -> None:
    """The operations of torch's _single_tensor_sgd, in place on the flat buffers."""
    lr, mu, damp, wd = hyper["lr"], hyper["momentum"], hyper["dampening"], hyper["weight_decay"]
    grad.div_(count)
    if hyper["maximize"]:
        grad.neg_()
    if wd != 0:
        grad.add_(theta, alpha=wd)
    if mu != 0:
        if first:
            momentum.copy_(grad)
        else:
            momentum.mul_(mu).add_(grad, alpha=1 - damp)
        if hyper["nesterov"]:
            grad.add_(momentum, alpha=mu)
            theta.add_(grad, alpha=-lr)
        else:
            theta.add_(momentum, alpha=-lr)
    else:
        theta.add_(grad, alpha=-lr)


def _fused_step(kernel, hyper, params, theta, grad_sum, count, momentum, first, write_params) -> None:
    np_dtype = np.float32 if theta.dtype == torch.float32 else np.float64
    c = {k: np_dtype(v) for k, v in (("count", count), ("lr", hyper["lr"]), ("mu", hyper["momentum"]),
                                      ("damp1", 1 - hyper["dampening"]), ("wd", hyper["weight_decay"]))}
    s, m, th = grad_sum.numpy(), momentum.numpy(), theta.numpy()
    flags = (bool(hyper["nesterov"]), bool(hyper["maximize"]), bool(first))
    offset = 0
    for p in params:
        n = p.numel()
        direct = write_params and p.device.type == "cpu" and p.dtype == theta.dtype and p.is_contiguous()
        sl = slice(offset, offset + n)
        out = p.detach().view(-1).numpy() if direct else th[sl]
        kernel(s[sl], m[sl], th[sl], out, c["count"], c["lr"], c["mu"], c["damp1"], c["wd"], *flags)
        if write_params and not direct:
            p.data.copy_(theta[sl].view(p.shape))
        offset += n


_KERNELS: dict = {}


def _compiled(name: str, like: Tensor):
    """A compiled kernel of methods/kernels/sgd.py for CPU float32/float64 buffers, or None (no numba, mergelab's
    kernels off, another device or dtype)."""
    from mergelab.methods.kernels import compiled_module, kernels_enabled

    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64) or not kernels_enabled():
        return None
    if "module" not in _KERNELS:
        _KERNELS["module"] = compiled_module("sgd")
    mod = _KERNELS["module"]
    return getattr(mod, name) if mod is not None else None


def _kernel(theta: Tensor):
    """The compiled SGD pass (see _fused_step), or None."""
    return _compiled("sgd_pass", theta)


def sub_kernel(out: Tensor):
    """The compiled out <- a - b pass that also says whether every value is finite, or None."""
    return _compiled("sub_finite", out)
