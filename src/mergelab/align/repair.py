"""REPAIR and RESCALE: undo the variance collapse of an interpolated network.

Averaging two aligned networks shrinks the variance of its hidden units (the units
of A and B are imperfectly correlated, so their average has a smaller spread), and
the collapse compounds with depth. REPAIR measures, on data, every hidden channel's
mean and standard deviation in A, in B and in the merged network, and rescales the
merged channel so that its statistics are the interpolation of the endpoints':

    mu_t = (1 - alpha) mu_A + alpha mu_B,   sigma_t = (1 - alpha) sigma_A + alpha sigma_B
    y'   = (y - mu_merged) * sigma_t / sigma_merged + mu_t         (REPAIR)
    y'   = y * sigma_t / sigma_merged                               (RESCALE, no mean shift)

folded into the layer that produces y (its weight rows and bias), or, for a BatchNorm,
into its running statistics and affine parameters. Layers are repaired in the order
they run, each measured after the ones before it were corrected.
Jordan, Sedghi, Saukh, Entezari & Neyshabur, 2022, "REPAIR: REnormalizing Permuted
Activations for Interpolation Repair", arXiv:2211.08403.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mergelab.align.matching import batches, run_model
from mergelab.align.spec import PermutationSpec
from mergelab.align.trace import spec_from_module
from mergelab.errors import MergeError

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _points(model: nn.Module, spec: PermutationSpec) -> list[str]:
    """Modules whose output is a permuted (hidden) unit: the layers REPAIR corrects."""
    modules = dict(model.named_modules())
    names = [m for taps in spec.taps.values() for m, where in taps
             if where == "out" and isinstance(modules.get(m), (*_LAYERS, *_BN))]
    if not names:
        raise MergeError("REPAIR found no Linear, Conv or BatchNorm layer with hidden outputs in the spec's taps; "
                         "it needs a network whose spec comes from spec_from_module")
    return names


def _channel_stats(model: nn.Module, names: list[str], data, inputs: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """Per module: (mean, std) of every output channel (input channel if `inputs`) over all of data."""
    modules = dict(model.named_modules())
    sums: dict[str, list] = {n: [0, 0, 0] for n in names}

    def hook(name):
        def record(mod, args, out):
            t = (args[0] if inputs else out).detach().double()
            ax = 1 if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_BN)) else t.dim() - 1
            flat = t.movedim(ax, -1).reshape(-1, t.shape[ax])  # (samples, channels)
            acc = sums[name]
            acc[0] += flat.shape[0]
            acc[1] = acc[1] + flat.sum(0)
            acc[2] = acc[2] + (flat * flat).sum(0)
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches(data):
                run_model(model, x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    out = {}
    for n, (count, s1, s2) in sums.items():
        if not count:
            raise MergeError(f"REPAIR: module {n} never ran on the data; check the data and the model")
        mean = s1 / count
        out[n] = (mean, (s2 / count - mean * mean).clamp_min(0).sqrt())
    return out


def _execution_order(model: nn.Module, names: list[str], data) -> list[str]:
    modules = dict(model.named_modules())
    order: list[str] = []
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: order.append(n) if n not in order else None)
               for n in names]
    try:
        with torch.no_grad():
            run_model(model, next(iter(batches(data))))
    finally:
        for h in handles:
            h.remove()
    return order


def _correct_layer(mod: nn.Module, mean: Tensor, std: Tensor, target_mean: Tensor, target_std: Tensor,
                   rescale_only: bool) -> None:
    ratio = (target_std / (std + 1e-8)).to(mod.weight.dtype)  # (C,)
    shape = (-1,) + (1,) * (mod.weight.dim() - 1)
    with torch.no_grad():
        mod.weight.mul_(ratio.view(shape))
        if mod.bias is not None:
            if rescale_only:
                mod.bias.mul_(ratio)
            else:
                mod.bias.copy_((mod.bias - mean.to(mod.bias.dtype)) * ratio + target_mean.to(mod.bias.dtype))


def _correct_bn(mod: nn.Module, in_mean: Tensor, in_std: Tensor, target_mean: Tensor, target_std: Tensor,
                rescale_only: bool) -> None:
    # Reset the running statistics to the merged network's own; the output is then
    # gamma * x_hat + beta with x_hat of (about) zero mean and unit variance.
    with torch.no_grad():
        mod.running_mean.copy_(in_mean.to(mod.running_mean.dtype))
        mod.running_var.copy_((in_std ** 2).to(mod.running_var.dtype))
        if mod.affine:
            mod.weight.copy_(torch.where(mod.weight < 0, -1.0, 1.0) * target_std.to(mod.weight.dtype))
            if not rescale_only:
                mod.bias.copy_(target_mean.to(mod.bias.dtype))


def repair(merged: nn.Module, model_a: nn.Module, model_b: nn.Module, data, alpha: float = 0.5, *,
           mode: str = "repair", spec: PermutationSpec | None = None) -> nn.Module:
    """A copy of `merged` whose hidden channels have the interpolated statistics of A and B.

    Args:
        merged: the interpolated network (1 - alpha) A + alpha B_aligned (not changed).
        model_a, model_b: the endpoints, B already aligned to A (same module names).
        data: inputs (tensor, list of batches, DataLoader; (x, y) pairs give x).
        alpha: where merged sits on the path from A (0) to B (1).
        mode: "repair" (mean and std) or "rescale" (std only, RESCALE).
        spec: permutation spec naming the hidden layers (default: traced from merged).

    Returns:
        the repaired copy (eval mode).
    """
    if mode not in ("repair", "rescale"):
        raise MergeError(f"repair: mode must be 'repair' or 'rescale', got {mode!r}")
    spec = spec if spec is not None else spec_from_module(merged)
    out = copy.deepcopy(merged).eval()
    names = _points(out, spec)
    stats_a = _channel_stats(model_a, names, data)
    stats_b = _channel_stats(model_b, names, data)
    modules = dict(out.named_modules())
    for name in _execution_order(out, names, data):
        (ma, sa), (mb, sb) = stats_a[name], stats_b[name]
        target_mean, target_std = (1 - alpha) * ma + alpha * mb, (1 - alpha) * sa + alpha * sb
        mod = modules[name]
        if isinstance(mod, _BN):
            mean, std = _channel_stats(out, [name], data, inputs=True)[name]
            _correct_bn(mod, mean, std, target_mean, target_std, mode == "rescale")
        else:
            mean, std = _channel_stats(out, [name], data)[name]
            _correct_layer(mod, mean, std, target_mean, target_std, mode == "rescale")
    return out


def interpolate_modules(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """(1 - alpha) A + alpha B as a new module (integer buffers from A)."""
    out = copy.deepcopy(model_a)
    sb: Mapping[str, Tensor] = model_b.state_dict()
    out.load_state_dict({k: torch.lerp(v, sb[k].to(v.dtype), alpha) if v.is_floating_point() else v
                         for k, v in model_a.state_dict().items()})
    return out
