"""The linear family: weighted averages and their close relatives.

linear, model_stock, nearswap and passthrough, with MergeKit 0.1.5's names,
parameters and defaults.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mergelab.methods.registry import MethodParams, PerModel, merge_method
from mergelab.methods.primitives import linear_weights, model_stock_ratio  # noqa: F401  (defined beside the kernels' helpers)
from mergelab.methods.kernels import lazy_kernel


def _bcast(w: Tensor, x: Tensor) -> Tensor:
    """(N,) weights -> (N, 1, ..., 1) to broadcast against x (N, *shape)."""
    return w.view(-1, *([1] * (x.dim() - 1)))


class LinearModel(MethodParams):
    weight: float = Field(description="weight of this model in the average")


class LinearShared(MethodParams):
    normalize: bool = Field(True, description="divide by the sum of the weights")


@merge_method("linear", model_params=LinearModel, shared_params=LinearShared, elementwise=True,
              divides_by_weight_sum=True, kernel=lazy_kernel("linear"))
def linear(x: Tensor, base: Tensor | None, p: PerModel[LinearModel], s: LinearShared, gen=None) -> Tensor:
    """Weighted average of the models ("model soups").

    theta = sum_i w_i theta_i / sum_i w_i   (normalize: true, the default)
    theta = sum_i w_i theta_i               (normalize: false)

    Wortsman et al. 2022, "Model soups", arXiv:2203.05482.

    Args:
        weight (per model, required): w_i.
        normalize: divide by sum_i w_i. Weights summing to zero cannot be
            normalised: an error, where MergeKit would divide by zero.

    x: (N, *shape) float32 (float64 stays float64); returns (*shape). On the CPU
    a compiled kernel (methods/kernels/linear.py) computes the same sum from
    bfloat16 or float32 inputs as stored, in one pass.
    """
    w = torch.tensor(linear_weights(p, s), dtype=x.dtype, device=x.device)
    return torch.tensordot(w, x, dims=1)  # (N,) . (N, M): one pass over the inputs


class PassthroughModel(MethodParams):
    scale: float | None = Field(None, description="multiply the tensor by this factor")


@merge_method("passthrough", model_params=PassthroughModel, max_models=1, elementwise=True)
def passthrough(x: Tensor, base: Tensor | None, p: PerModel[PassthroughModel], s, gen=None) -> Tensor:
    """Copy the one input tensor unchanged (optionally scaled): used to stack layers with `slices`.

    theta = scale * theta_1   (scale defaults to 1)

    Args:
        scale (per model, optional): a factor, e.g. to damp a duplicated layer.
    """
    scale = p[0].scale
    return x[0].clone() if scale is None else x[0] * scale


class NearswapShared(MethodParams):
    # MergeKit accepts any t, but a negative one silently returns the base everywhere: reject it.
    t: float = Field(ge=0, description="distance below which the other model's value is taken as is")


@merge_method("nearswap", shared_params=NearswapShared, base="required", min_models=1, max_models=1,
              elementwise=True, kernel=lazy_kernel("nearswap"))
def nearswap(x: Tensor, base: Tensor, p, s: NearswapShared, gen=None) -> Tensor:
    """Take the secondary model's value where it is close to the base's, interpolate elsewhere.

    w_j = clamp(t / max(|base_j - v_j|, 1e-6), 0, 1)
    theta_j = (1 - w_j) base_j + w_j v_j

    Nearswap as defined by MergeKit (alchemonaut, QuartetAnemoi-70B-t0.0001, 2024).

    Args:
        t (shared, required, >= 0): the distance below which v replaces the base entirely.
    """
    v = x[0]
    w = (s.t / (base - v).abs().clamp_min(1e-6)).clamp(0, 1)
    return w * v + (1 - w) * base


class ModelStockShared(MethodParams):
    filter_wise: bool = Field(False, description="one ratio per row (last dimension) instead of per tensor")


@merge_method("model_stock", shared_params=ModelStockShared, base="required", min_models=2,
              kernel=lazy_kernel("model_stock"))
def model_stock(x: Tensor, base: Tensor, p, s: ModelStockShared, gen=None) -> Tensor:
    """Model Stock: average the fine-tunes, then pull the average toward the base by their mutual angle.

    cos = mean over pairs i < j of cos(tau_i, tau_j), tau_i = theta_i - theta_base
    t = N cos / (1 + (N - 1) cos)       (t = 0 where the denominator vanishes)
    theta = t * mean_i theta_i + (1 - t) * theta_base

    Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned
    models", arXiv:2403.19522.

    For N > 2 FusionBench's ModelStock averages the pairwise angles and takes the cosine
    of the mean; this (as MergeKit) averages the cosines, so the two agree for N = 2 only
    (within float32 rounding), and only where |tau_i| |tau_j| >= 1e-6: below it the
    MergeKit floor here shrinks the cosine (t -> 0, the base kept), where FusionBench
    divides by |tau_i| |tau_j| + 1e-8.

    Norms and dots are float32 sums of products; on the CPU a compiled kernel
    (methods/kernels/model_stock.py) computes the same from bfloat16 or float32
    inputs as stored, the sums in float64.

    Args:
        filter_wise (shared): one ratio per row (reducing the last dimension)
            instead of one per tensor.
    """
    n = x.shape[0]
    shape = base.shape
    if s.filter_wise:
        b = base.unsqueeze(0) if base.dim() == 1 else base
        tau = (x.unsqueeze(1) if base.dim() == 1 else x) - b  # (N, ..., last)
    else:
        b = base.reshape(-1)
        tau = x.reshape(n, -1) - b  # (N, M)
    # Sums of products (torch's cascade sum): on the CPU vector_norm and vecdot of float32 drift
    # by up to 6e-3 relative on a 65M-entry tensor, .sum() by 2e-8.
    norms = torch.stack([(tau[i] * tau[i]).sum(-1).sqrt() for i in range(n)])  # (N, ...)
    dots = torch.stack([(tau[i] * tau[j]).sum(-1) for i in range(n) for j in range(i + 1, n)])
    del tau  # free the task vectors before the average is made
    t = model_stock_ratio(norms, dots).unsqueeze(-1)  # (..., 1)
    out = x.mean(0).reshape(b.shape).mul_(t)  # t * mean_i theta_i
    out += (1 - t) * b
    return out.reshape(shape)
