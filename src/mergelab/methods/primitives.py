"""Helpers the readable methods and their kernels share: weights, coefficients and checks, pure torch.

Both a family module (methods/<family>.py) and its kernel (methods/kernels/<name>.py) import
these, so kernels never import a family. Each helper was defined in the family named beside
it and is still importable from there.
"""

from __future__ import annotations

import math

import torch
from torch import Generator, Tensor

from mergelab.errors import MergeError
from mergelab.methods.registry import MethodParams, PerModel


# MergeKit's threshold below which a weight sum counts as zero.
_ZERO_WEIGHT_SUM = 1e-8


def weight_divisor(weights: Tensor) -> float:
    """sum_i w_i of the (N,) weights, the divisor of `normalize`.

    Raises:
        MergeError: the weights sum to zero.
    """
    divisor = float(weights.sum())
    if abs(divisor) < _ZERO_WEIGHT_SUM:
        # MergeKit silently divides by 1 here; a zero sum means the recipe is wrong.
        raise MergeError(
            f"the weights {weights.tolist()} sum to zero, so `normalize: true` would divide by zero; "
            "change the weights or set normalize: false"
        )
    return divisor


def require_generator(name: str, gen: Generator | None) -> None:
    if gen is None:
        raise MergeError(f"{name} is randomised and needs a torch.Generator; the engine seeds one per tensor")


def linear_weights(p: PerModel[MethodParams], s: MethodParams) -> list[float]:
    """The coefficients w_i (divided by sum_i w_i when normalize); shared by the reference and its kernel."""
    w = [float(q.weight) for q in p]
    if s.normalize:
        total = sum(w)
        if abs(total) < 1e-8:
            raise MergeError("linear: the weights sum to zero, so they cannot be normalised; "
                             "change the weights or set `normalize: false`")
        w = [v / total for v in w]
    return w


def model_stock_ratio(norms: Tensor, dots: Tensor) -> Tensor:
    """t per vector from the task vectors' norms (N, ...) and pairwise dots (pairs i < j in order, ...), float32.

    cos = mean over pairs of clamp(<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), -1, 1),
    t = N cos / (1 + (N - 1) cos), and t = 0 where |1 + (N - 1) cos| < 1e-6.
    Shared by the reference and its kernel (methods/kernels/model_stock.py).
    """
    n = norms.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack([(dots[k] / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1, 1)
                       for k, (i, j) in enumerate(pairs)])
    c = cos.mean(0)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    # Where the denominator vanishes there is no finite ratio: keep the base there (MergeKit does too).
    safe = torch.where(singular, torch.ones_like(denom), denom)
    return torch.where(singular, torch.zeros_like(c), n * c / safe)


def weights_from_squares(squares: list[float], n: int) -> Tensor:
    """(N,) float32 eta_i = mean(tau_i^2) / sum_j mean(tau_j^2) from the float64 sums of squares.

    Uniform when every tau_i is zero. Each ratio is taken in float64 and rounded
    once, so a kernel summing in another order gives the same weights.
    """
    ms = [q / n for q in squares]
    total = sum(ms)
    # Only an exactly zero total is special (then the merge is zero whatever the weights);
    # MergeKit's absolute 1e-6 threshold would switch small real task vectors to uniform weights.
    return torch.tensor([m / total if total > 0 else 1 / len(ms) for m in ms], dtype=torch.float32)


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


def flat_slerp_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """slerp_coefficients from the float64 sums |a|^2, |b|^2 and <a, b>, each rounded once to float32."""
    def f32(v: float) -> Tensor:
        return torch.tensor(v, dtype=torch.float32)

    c0, c1 = slerp_coefficients(t, f32(ab), f32(math.sqrt(aa)), f32(math.sqrt(bb)))
    return float(c0), float(c1)


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


def nuslerp_t(p: PerModel[MethodParams]) -> float:
    """t = w_2 / (w_1 + w_2), or 0.5 when the weights sum to ~0 (MergeKit's rule)."""
    if len(p) != 2:
        raise MergeError(f"nuslerp merges exactly 2 models (besides the base), got {len(p)}; "
                         "use multislerp for more")
    w1, w2 = p.values("weight")
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


def _length(unit_gram: Tensor, k: Tensor) -> Tensor:
    """|sum_i k_i u_i| from the Gram matrix <u_i, u_j> (rounding cannot make it negative)."""
    return (k @ unit_gram @ k).clamp_min(0).sqrt()


def multislerp_coefficients(gram: Tensor, w: Tensor, eps: float) -> Tensor | None:
    """k (float64) with multislerp = sum_i k_i v_i (+ base), from G_ij = <v_i, v_j> and the weights w.

    With u_i = r_i v_i, r_i = 1 / (|v_i| + eps), and m = sum_j b_j u_j:
    b = w / |sum_i w_i u_i|; the tangent g = sum_i w_i (u_i - <u_i, m> m) has coefficients
    w - (sum_i w_i <u_i, m>) b; the result (cos|g| m + sin|g| g/|g|) sum_i w_i |v_i| is
    k_i = (cos|g| b_i + sin|g|/|g| g_i) * sum_j w_j |v_j| * r_i, where every <., .> and |.|
    comes from G. None when the weighted directions cancel (|sum_i w_i u_i| < eps).
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    r = 1 / (norms + eps)
    unit_gram = gram * r[:, None] * r[None, :]
    mean_norm = _length(unit_gram, w)
    if mean_norm < eps:
        return None
    b = w / mean_norm
    dots = unit_gram @ b
    g = w - (w @ dots) * b
    g_norm = _length(unit_gram, g) + eps
    return (torch.cos(g_norm) * b + (torch.sin(g_norm) / g_norm) * g) * (norms @ w) * r


def multislerp_weights(gram: Tensor, w: Tensor, s: MethodParams) -> Tensor:
    """multislerp's coefficients k (float64) from the Gram matrix and the float32 weights, with its fallbacks."""
    if s.normalize_weights:
        total = float(w.sum())
        if abs(total) < 1e-8:
            raise MergeError("multislerp: the weights sum to zero, so they cannot be normalised; "
                             "change the weights or set `normalize_weights: false`")
        w = w / total
    w = w.double()
    coef = multislerp_coefficients(gram, w, s.eps)
    if coef is not None:
        return coef
    # Two antipodal models: MergeKit's linear fallback. Every vector zero (all models equal the
    # base, or a tensor that is zero everywhere): the merge is that zero vector, where MergeKit
    # raises for three or more models.
    if len(w) == 2 or bool((gram.diagonal().clamp_min(0).sqrt() <= s.eps).all()):
        return w
    raise MergeError("multislerp: the weighted directions cancel out (antipodal models with balancing "
                     "weights); change the weights")


def karcher_coefficients(gram: Tensor, max_iter: int, tol: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """k (float64) with karcher = sum_i k_i v_i, from G_ij = <v_i, v_j>: the iteration on coefficients.

    With u_i = v_i / |v_i| over the models with |v_i| > tol and m = sum_j b_j u_j:
    <u_i, m> = (U b)_i with U_ij = <u_i, u_j>; the tangent sum_i a_i f_i (u_i - <u_i, m> m)
    has coefficients c - (c . <u, m>) b with c_i = a_i f_i; each length |sum_j k_j u_j| is
    sqrt(k' U k). The angles omega_i = arccos<u_i, m> are taken from cosines rounded to
    `dtype` (the inputs' compute dtype), as MergeKit computes them, so that the same points
    count as already at the mean (omega_i < tol); everything else is float64.
    """
    n = gram.shape[0]
    norms = gram.diagonal().clamp_min(0).sqrt()
    coef = torch.zeros(n, dtype=torch.float64, device=gram.device)
    valid = (norms.to(dtype) > tol).nonzero().flatten()
    if len(valid) == 0:
        return coef
    nv = norms[valid]
    unit_gram = gram[valid][:, valid] / (nv[:, None] * nv[None, :])
    a = torch.full((len(valid),), 1 / len(valid), dtype=torch.float64, device=gram.device)
    b = a
    m_norm = _length(unit_gram, b)
    b = torch.eye(len(valid), dtype=torch.float64, device=gram.device)[0] if m_norm < tol else b / m_norm
    for _ in range(max_iter):
        dots = (unit_gram @ b).clamp(-1, 1)
        omega = torch.arccos(dots.to(dtype))
        # An (almost) antipodal point has no defined direction from m: at omega = pi, sin(omega) is
        # rounding noise whose sign is arbitrary, so such a point adds nothing to a step.
        sin = torch.sin(omega)
        usable = (omega >= tol) & (sin > 1e-6)
        factor = torch.where(usable, omega / torch.where(usable, sin, torch.ones_like(sin)), torch.zeros_like(sin))
        c = a * factor.double()
        tangent = c - (c @ dots) * b
        t_norm = _length(unit_gram, tangent)
        if t_norm < tol:
            break
        b = torch.cos(t_norm) * b + (torch.sin(t_norm) / t_norm) * tangent
        m_norm = _length(unit_gram, b)
        if m_norm > tol:
            b = b / m_norm
    coef[valid] = norms.sum() / n * b / nv  # scale = sum_i |v_i| / n, over every model
    return coef
