"""The spherical family: interpolate along great circles instead of straight lines.

slerp, nuslerp, multislerp and karcher, with MergeKit 0.1.5's names,
parameters and defaults. Each treats a whole tensor as one vector (nuslerp can
work row by row); norms are carried separately from directions.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mergelab.methods.registry import MethodParams, PerModel, merge_method
from mergelab.methods.primitives import (  # noqa: F401  (defined beside the kernels' helpers)
    flat_slerp_coefficients, karcher_coefficients, multislerp_weights, nuslerp_coefficients, nuslerp_t,
    slerp_coefficients,
)
from mergelab.methods.kernels import lazy_kernel


def _unit(v: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(v / |v|, |v|) over the last dimension; a near-zero vector keeps norm 1 so it stays finite."""
    norm = v.norm(dim=-1, keepdim=True)
    safe = torch.where(norm > eps, norm, torch.ones_like(norm))
    return v / safe, norm


def slerp_vectors(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = 0.9995,
                  eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of the rows of v0 and v1 (..., d); falls back to lerp when nearly colinear.

    With cos(omega) = <v0/|v0|, v1/|v1|>:
        slerp(t) = sin((1 - t) omega) / sin(omega) * v0 + sin(t omega) / sin(omega) * v1
    the coefficients applied to the raw (not normalised) vectors, as MergeKit does.
    """
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True)
    raw = torch.linalg.vecdot(v0, v1, dim=-1).unsqueeze(-1)  # no unit vectors materialised
    c0, c1 = slerp_coefficients(t, raw, n0, n1, dot_threshold=dot_threshold, eps=eps)
    return c0 * v0 + c1 * v1


_SUM_BLOCK = 1 << 20


def _float64_sums(a: Tensor, b: Tensor) -> tuple[float, float, float]:
    """(|a|^2, |b|^2, <a, b>) of two flat tensors, accumulated in float64 a block at a time."""
    aa = bb = ab = 0.0
    for start in range(0, a.numel(), _SUM_BLOCK):
        x, y = a[start:start + _SUM_BLOCK].double(), b[start:start + _SUM_BLOCK].double()
        aa, bb, ab = aa + float(x @ x), bb + float(y @ y), ab + float(x @ y)
    return aa, bb, ab


class SlerpShared(MethodParams):
    t: float = Field(description="interpolation factor: 0 gives the base model, 1 the other model")


@merge_method("slerp", shared_params=SlerpShared, base="required", min_models=1, max_models=1,
              kernel=lazy_kernel("slerp"))
def slerp(x: Tensor, base: Tensor, p, s: SlerpShared, gen=None) -> Tensor:
    """Spherical linear interpolation between the base model and one other model.

    omega = arccos(<a/|a|, b/|b|>) over the flattened tensors a = base, b = other,
    theta = sin((1-t) omega)/sin(omega) a + sin(t omega)/sin(omega) b,
    and plain linear interpolation when |cos omega| > 0.9995.

    Shoemake 1985, "Animating rotation with quaternion curves"; used for
    model merging by MergeKit (Goddard et al. 2024, arXiv:2403.13257).

    The norms and the dot product are summed in float64 and rounded once to
    float32 (a compiled kernel, methods/kernels/slerp.py, sums the same way in
    another order: the two agree to the last float32 bit but for rare cases),
    and theta = c0 a + c1 b is rounded term by term, without fused multiply-adds.

    Args:
        t (shared, required): 0 returns the base, 1 the other model; usually a
            gradient over layers or a filter list.
    """
    a, b = base.reshape(-1), x[0].reshape(-1)
    c0, c1 = flat_slerp_coefficients(s.t, *_float64_sums(a, b))
    return (a * c0 + b * c1).reshape(base.shape)


class NuslerpModel(MethodParams):
    weight: float = Field(description="relative weight of this model; t = w_2 / (w_1 + w_2)")


class NuslerpShared(MethodParams):
    nuslerp_flatten: bool = Field(True, description="treat the whole tensor as one vector")
    nuslerp_row_wise: bool = Field(
        False, description="when not flattened: slerp each column (vectors along dim 0) instead of each row")


def _nuslerp_pair(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool, flatten: bool) -> Tensor:
    """c0 v0 + c1 v1 (nuslerp_coefficients) per vector: the flattened tensor, each row, or each column.

    Norms and dot products are sums of products (torch's cascade sum: on the CPU,
    torch.linalg.vector_norm and vecdot of float32 drift by up to 6e-3 relative on a
    65M-entry tensor, .sum() by 2e-8); no unit vectors are materialised. The result is a
    new tensor, v0 and v1 are not modified.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    n0 = (v0 * v0).sum(-1, keepdim=True).sqrt()  # (..., 1)
    n1 = (v1 * v1).sum(-1, keepdim=True).sqrt()
    dot = (v0 * v1).sum(-1, keepdim=True)
    c0, c1 = nuslerp_coefficients(t, n0, n1, dot)
    out = v0 * c0
    out += v1 * c1
    if not flatten and row_wise:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@merge_method("nuslerp", model_params=NuslerpModel, shared_params=NuslerpShared, base="optional",
              min_models=2, max_models=2, kernel=lazy_kernel("nuslerp"))
def nuslerp(x: Tensor, base: Tensor | None, p: PerModel[NuslerpModel], s: NuslerpShared, gen=None) -> Tensor:
    """SLERP between exactly two models with relative weights, optionally of task vectors.

    t = w_2 / (w_1 + w_2)   (0.5 when the weights sum to ~0)
    theta = slerp(t, v_1, v_2)                          without a base
    theta = base + slerp(t, v_1 - base, v_2 - base)     with a base (task-vector SLERP)
    slerp(t, v_1, v_2) = sin((1-t) omega)/sin(omega) v_1 + sin(t omega)/sin(omega) v_2,
    cos omega = <v_1, v_2> / (|v_1| |v_2|); lerp where the two are (anti)parallel.

    MergeKit's "NuSLERP" (Goddard et al. 2024, arXiv:2403.13257): slerp over the
    flattened tensor by default, or over each row (or column) separately. Slerp
    itself: Shoemake 1985, "Animating rotation with quaternion curves".

    Numbers: MergeKit divides (sin((1-t) omega) v_1 + sin(t omega) v_2) by sin(omega)
    after combining; here the two coefficients are divided first (a few float32 ulps
    apart, tests/methods/test_nuslerp_stock_kernels.py keeps the old formula). On the CPU a
    compiled kernel (methods/kernels/nuslerp.py) computes the same from bfloat16 or
    float32 inputs as stored, its norms summed in float64.

    Args:
        weight (per model, required): relative weights w_1, w_2.
        nuslerp_flatten (shared): one vector per tensor (default true).
        nuslerp_row_wise (shared): with flatten off, slerp columns instead of rows.
    """
    t = nuslerp_t(p)
    flags = dict(row_wise=s.nuslerp_row_wise, flatten=s.nuslerp_flatten)
    if base is None:
        return _nuslerp_pair(t, x[0], x[1], **flags)
    out = _nuslerp_pair(t, x[0] - base, x[1] - base, **flags)
    return out.add_(base)  # = base + slerp(...): the same float32 sum


class MultislerpModel(MethodParams):
    weight: float = Field(description="weight of this model")


class MultislerpShared(MethodParams):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, ge=0, description="numerical floor")


# multislerp and karcher only ever combine the vectors they are given: every mean, tangent and
# step is sum_i k_i v_i for some coefficients k. So both run on the (n, n) Gram matrix of the
# vectors (one pass over the inputs) and write sum_i k_i v_i at the end (a second pass), instead
# of holding unit vectors and (n, numel) temporaries and passing over them at every step.

_GRAM_BLOCK = 1 << 20


def gram_matrix(x: Tensor, base: Tensor | None = None) -> Tensor:
    """G_ij = <v_i, v_j> (float64, (n, n)) of the rows v_i = x_i - base (or x_i) of x (n, *shape).

    v_i is formed in x's dtype, as the methods form task vectors; products and sums are in
    float64, a block of columns at a time (no float64 copy of x is made).
    """
    n = x.shape[0]
    flat = x.reshape(n, -1)
    b = base.reshape(-1) if base is not None else None
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for start in range(0, flat.shape[1], _GRAM_BLOCK):
        v = flat[:, start:start + _GRAM_BLOCK]
        if b is not None:
            v = v - b[start:start + _GRAM_BLOCK]
        v = v.double()
        gram += v @ v.T
    return gram


def combine_rows(x: Tensor, base: Tensor | None, coef: Tensor) -> Tensor:
    """sum_i coef_i v_i (+ base) in x's dtype, shape x.shape[1:], with v_i = x_i - base (or x_i)."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    c = coef.to(dtype=x.dtype, device=x.device)
    if base is None:
        return (c @ flat).reshape(x.shape[1:])
    b = base.reshape(-1)
    out = torch.empty_like(b)
    for start in range(0, b.numel(), _GRAM_BLOCK):  # no (n, numel) task vectors at once
        part = slice(start, start + _GRAM_BLOCK)
        torch.mm(c.view(1, -1), flat[:, part] - b[part], out=out[part].view(1, -1))
        out[part] += b[part]
    return out.reshape(x.shape[1:])


@merge_method("multislerp", model_params=MultislerpModel, shared_params=MultislerpShared, base="optional",
              kernel=lazy_kernel("spherical_mean", method="multislerp"))
def multislerp(x: Tensor, base: Tensor | None, p: PerModel[MultislerpModel], s: MultislerpShared,
               gen=None) -> Tensor:
    """Barycentric interpolation of N models on the hypersphere (one tangent-space step).

    u_i = v_i / |v_i| (v_i = theta_i, or theta_i - base with a base),
    m = normalise(sum_i w_i u_i), tangent g = sum_i w_i (u_i - <u_i, m> m),
    theta = (cos|g| m + sin|g| g/|g|) * sum_i w_i |v_i|  (+ base).
    In exact arithmetic g = M - <M, m> m = 0 (M = sum_i w_i u_i), so this is
    normalise(sum_i w_i u_i) * sum_i w_i |v_i|; the step is kept, as in MergeKit.

    MergeKit's Multi-SLERP (Goddard, "multislerp", 2025).

    Every vector above is a combination sum_i k_i v_i, so the steps run on the
    Gram matrix G_ij = <v_i, v_j> (float64 sums; multislerp_coefficients) and
    theta = sum_i k_i v_i (+ base) is written in one pass: two passes over the
    inputs in all. The float64 sums also keep the result exact on big tensors,
    where MergeKit's float32 norms drift (0.6% on a 65M-entry lm_head, giving a
    result 1.1% too small; docs/results-spherical-speed.md).

    Args:
        weight (per model, required): w_i.
        normalize_weights (shared): w_i / sum_j w_j (default true); weights summing
            to zero are an error.
        eps (shared): floor on norms.

    Directions that cancel out fall back to sum_i w_i v_i (+ base) for two models
    (as MergeKit) or when every v_i is zero (MergeKit raises); otherwise an error.
    """
    if x.shape[0] == 1:
        return x[0].clone()
    coef = multislerp_weights(gram_matrix(x, base), p.tensor("weight", x), s)
    return combine_rows(x, base, coef)


class KarcherShared(MethodParams):
    max_iter: int = Field(10, ge=0, description="maximum Riemannian gradient steps")
    tol: float = Field(1e-5, gt=0, description="stop when the tangent step is shorter than this")


@merge_method("karcher", shared_params=KarcherShared, kernel=lazy_kernel("spherical_mean", method="karcher"))
def karcher(x: Tensor, base, p, s: KarcherShared, gen=None) -> Tensor:
    """Karcher (Riemannian) mean of the models' directions on the sphere, times their mean norm.

    Iterate m <- exp_m(sum_i a_i log_m(u_i)) with u_i = theta_i/|theta_i|, uniform
    a_i = 1/N, log_m(u) = omega/sin(omega) (u - cos(omega) m); then
    theta = (sum_i a_i |theta_i|) m. Models with norm <= tol are left out of the
    direction (not of the norm); a point antipodal to m adds nothing to a step.

    Karcher 1977, "Riemannian center of mass and mollifier smoothing"; for
    merging as MergeKit's `karcher` method (its reference: arXiv:2603.04972).

    m and every step are combinations sum_i k_i theta_i, so the iteration runs on
    the Gram matrix G_ij = <theta_i, theta_j> (float64 sums; karcher_coefficients)
    and theta = sum_i k_i theta_i is written in one pass: two passes over the
    inputs, whatever the number of iterations. The cosines are exact before being
    rounded to float32 for the angles (as MergeKit's are), so two fine-tunes at
    equal angles from the mean are treated alike; MergeKit's float32 sums can skip
    one of them (omega < tol) and step towards the other.

    Args:
        max_iter (shared): iteration cap (default 10).
        tol (shared): convergence tolerance (default 1e-5).
    """
    if x.shape[0] == 1:
        return x[0].clone()
    return combine_rows(x, None, karcher_coefficients(gram_matrix(x), s.max_iter, s.tol, x.dtype))


__all__ = ["slerp", "nuslerp", "multislerp", "karcher", "slerp_vectors"]
