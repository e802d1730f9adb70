"""The spherical family: interpolate along great circles instead of straight lines.

slerp, nuslerp, multislerp and karcher, with MergeKit 0.1.5's names,
parameters and defaults. Each treats a whole tensor as one vector (nuslerp can
work row by row); norms are carried separately from directions.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from mergelab.errors import MergeError
from mergelab.methods import MethodParams, PerModel, merge_method
from mergelab.methods.kernels import lazy_kernel


def _unit(v: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(v / |v|, |v|) over the last dimension; a near-zero vector keeps norm 1 so it stays finite."""
    norm = v.norm(dim=-1, keepdim=True)
    safe = torch.where(norm > eps, norm, torch.ones_like(norm))
    return v / safe, norm


def slerp_coefficients(t: float, raw: Tensor, n0: Tensor, n1: Tensor, *, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """(c0, c1) with slerp(t) = c0 v0 + c1 v1, from <v0, v1> (raw) and the norms |v0|, |v1| (float32).

    cos omega = raw / |v0| / |v1| (a norm <= eps counts as 1), clamped to [-1, 1];
    c0 = sin((1 - t) omega) / sin omega, c1 = sin(t omega) / sin omega, and
    c0 = 1 - t, c1 = t when |cos omega| > dot_threshold (nearly colinear or antipodal).
    """
    n0 = torch.where(n0 > eps, n0, torch.ones_like(n0))
    n1 = torch.where(n1 > eps, n1, torch.ones_like(n1))
    dot = (raw / n0 / n1).clamp(-1, 1)
    colinear = dot.abs() > dot_threshold
    omega = torch.acos(torch.where(colinear, torch.zeros_like(dot), dot))
    sin_omega = torch.sin(omega)
    safe_sin = torch.where(colinear, torch.ones_like(sin_omega), sin_omega)
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * omega) / safe_sin)
    c1 = torch.where(colinear, torch.full_like(dot, t), torch.sin(t * omega) / safe_sin)
    return c0, c1


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


def flat_slerp_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """slerp_coefficients from the float64 sums |a|^2, |b|^2 and <a, b>, each rounded once to float32."""
    def f32(v: float) -> Tensor:
        return torch.tensor(v, dtype=torch.float32)

    c0, c1 = slerp_coefficients(t, f32(ab), f32(math.sqrt(aa)), f32(math.sqrt(bb)))
    return float(c0), float(c1)


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


def nuslerp_coefficients(t: float, n0: Tensor, n1: Tensor, dot: Tensor, *,
                         eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """(c0, c1) with nuslerp(t) = c0 v0 + c1 v1, from |v0|, |v1| and <v0, v1> (float32, one per vector).

    cos omega = <v0, v1> / (max(|v0|, 1e-7) max(|v1|, 1e-7)), clamped to [-1, 1];
    c0 = sin((1 - t) omega) / sin omega, c1 = sin(t omega) / sin omega, and
    c0 = 1 - t, c1 = t where 1 - cos^2 <= eps^2 (colinear or antipodal), as MergeKit 0.1.5.
    Shared by the reference and its kernel (methods/kernels/nuslerp.py).
    """
    cos = (dot / (n0.clamp_min(1e-7) * n1.clamp_min(1e-7))).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_omega = torch.where(colinear, torch.ones_like(cos), torch.sin(omega))
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * omega) / sin_omega)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * omega) / sin_omega)
    return c0, c1


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


def nuslerp_t(p: PerModel[NuslerpModel]) -> float:
    """t = w_2 / (w_1 + w_2), or 0.5 when the weights sum to ~0 (MergeKit's rule)."""
    if len(p) != 2:
        raise MergeError(f"nuslerp merges exactly 2 models (besides the base), got {len(p)}; "
                         "use multislerp for more")
    w1, w2 = p.values("weight")
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


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


@merge_method("multislerp", model_params=MultislerpModel, shared_params=MultislerpShared, base="optional")
def multislerp(x: Tensor, base: Tensor | None, p: PerModel[MultislerpModel], s: MultislerpShared,
               gen=None) -> Tensor:
    """Barycentric interpolation of N models on the hypersphere (one tangent-space step).

    u_i = v_i / |v_i| (v_i = theta_i, or theta_i - base with a base),
    m = normalise(sum_i w_i u_i), tangent g = sum_i w_i (u_i - <u_i, m> m),
    theta = (cos|g| m + sin|g| g/|g|) * sum_i w_i |v_i|  (+ base).
    In exact arithmetic g = M - <M, m> m = 0 (M = sum_i w_i u_i), so this is
    normalise(sum_i w_i u_i) * sum_i w_i |v_i|; the step is kept so the rounding
    matches MergeKit's.

    MergeKit's Multi-SLERP (Goddard, "multislerp", 2025).

    Args:
        weight (per model, required): w_i.
        normalize_weights (shared): w_i / sum_j w_j (default true); weights summing
            to zero are an error.
        eps (shared): floor on norms.

    Directions that cancel out fall back to sum_i w_i v_i (+ base) for two models
    (as MergeKit) or when every v_i is zero (MergeKit raises); otherwise an error.
    """
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    v = (x - base if base is not None else x).reshape(n, -1)
    w = p.tensor("weight", x)
    if s.normalize_weights:
        total = float(w.sum())
        if abs(total) < 1e-8:
            raise MergeError("multislerp: the weights sum to zero, so they cannot be normalised; "
                             "change the weights or set `normalize_weights: false`")
        w = w / total
    norms = v.norm(dim=-1, keepdim=True)
    units = v / (norms + s.eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < s.eps:
        # Two antipodal models: MergeKit's linear fallback. Every vector zero (all models equal
        # the base, or a tensor that is zero everywhere): the merge is that zero vector, where
        # MergeKit raises for three or more models.
        if n == 2 or bool((norms <= s.eps).all()):
            out = (v * w.view(-1, 1)).sum(0).reshape(x.shape[1:])
            return out + base if base is not None else out
        raise MergeError("multislerp: the weighted directions cancel out (antipodal models with balancing "
                         "weights); change the weights")
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    g = (tangent * w.view(-1, 1)).sum(0)
    g_norm = g.norm() + s.eps
    out = mean * torch.cos(g_norm) + g * (torch.sin(g_norm) / g_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).reshape(x.shape[1:])
    return out + base if base is not None else out


class KarcherShared(MethodParams):
    max_iter: int = Field(10, ge=0, description="maximum Riemannian gradient steps")
    tol: float = Field(1e-5, gt=0, description="stop when the tangent step is shorter than this")


@merge_method("karcher", shared_params=KarcherShared)
def karcher(x: Tensor, base, p, s: KarcherShared, gen=None) -> Tensor:
    """Karcher (Riemannian) mean of the models' directions on the sphere, times their mean norm.

    Iterate m <- exp_m(sum_i a_i log_m(u_i)) with u_i = theta_i/|theta_i|, uniform
    a_i = 1/N, log_m(u) = omega/sin(omega) (u - cos(omega) m); then
    theta = (sum_i a_i |theta_i|) m. Models with norm <= tol are left out of the
    direction (not of the norm); a point antipodal to m adds nothing to a step.

    Karcher 1977, "Riemannian center of mass and mollifier smoothing"; for
    merging as MergeKit's `karcher` method (its reference: arXiv:2603.04972).

    Args:
        max_iter (shared): iteration cap (default 10).
        tol (shared): convergence tolerance (default 1e-5).
    """
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    v = x.reshape(n, -1)
    norms = v.norm(dim=-1)
    alphas = [1.0 / n] * n
    valid = [i for i in range(n) if float(norms[i]) > s.tol]
    if not valid:
        return torch.zeros_like(x[0])
    a_valid = torch.tensor([alphas[i] for i in valid], dtype=v.dtype, device=v.device)
    a_valid = a_valid / a_valid.sum()
    units = v[valid] / norms[valid].unsqueeze(-1)
    mean = (units * a_valid.view(-1, 1)).sum(0)
    mean = units[0].clone() if float(mean.norm()) < s.tol else mean / mean.norm()
    for _ in range(s.max_iter):
        dots = (units @ mean).clamp(-1, 1)
        omega = torch.arccos(dots)
        moving = omega >= s.tol
        # An (almost) antipodal point has no defined direction from m: at omega = pi, sin(omega) is
        # rounding noise whose sign is arbitrary, so such a point adds nothing to the step.
        sin = torch.sin(omega)
        usable = moving & (sin > 1e-6)
        safe_sin = torch.where(usable, sin, torch.ones_like(sin))
        factor = torch.where(usable, omega / safe_sin, torch.zeros_like(omega))
        tangent = ((a_valid * factor).unsqueeze(-1) * (units - dots.unsqueeze(-1) * mean)).sum(0)
        t_norm = tangent.norm()
        if float(t_norm) < s.tol:
            break
        mean = torch.cos(t_norm) * mean + torch.sin(t_norm) * (tangent / t_norm)
        m_norm = mean.norm()
        if float(m_norm) > s.tol:
            mean = mean / m_norm
    scale = sum(a * float(nrm) for a, nrm in zip(alphas, norms))
    return (scale * mean).reshape(x.shape[1:])


__all__ = ["slerp", "nuslerp", "multislerp", "karcher", "slerp_vectors"]
