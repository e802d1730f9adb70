"""TIES for search candidates: one fused, vectorised pass per tensor, thresholds known in advance.

A search knows each task vector's threshold T_i and tie cut-off c_i before the pass (they come
from the magnitude order, search/magnitude.py), so what is left per element j is one pass that
reads the inputs as stored (bfloat16 bits or float32) and writes the model's tensor:

    v_i    = theta_i[j] - theta_base[j]                       (float32)
    keep_i = |v_i| >= T_i if j < c_i else |v_i| > T_i         (exactly k_i entries kept, ties
                                                               lowest index first)
    d_i    = (v_i if keep_i else 0) * w_i
    s      = sum_i d_i >= 0                                   (elected sign: + where the sum is >= 0)
    a_i    = d_i > 0 if s else d_i < 0                        (agrees with the elected sign)
    m      = sum_i [a_i] d_i,  Z = sum_i [a_i] w_i
    out[j] = round(theta_base[j] + lambda * (m / (Z if Z != 0 else 1) if normalize else m))

with the float32 operations of methods/sparsify.py's `ties` in its order (sums over models from
model 0 on), rounded to bfloat16 as torch rounds (nearest even). Every branch is a select on
values, the cut-off an index comparison, so the compiler vectorises the loop; the
engine's kernel (methods/kernels/ties.py) does the same arithmetic but splits the range at
the cut-offs and branches per element. Yadav et al. 2023, arXiv:2306.01708.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels.io import as_array, load, store

__all__ = ["ties_into"]

_BLOCK = 1 << 15  # elements per parallel block of the many-model pass
_TILE = 256  # elements per tile: every model's slice of a tile stays in L1


@njit(parallel=True, nogil=True, cache=True)
def _pair(x0, x1, base, t0, u0, c0, t1, u1, c1, w0, w1, normalize, lam, out):
    """out = TIES of two task vectors; t_i the threshold, u_i the next float32 above it, c_i the cut-off."""
    zero, one = np.float32(0.0), np.float32(1.0)
    for j in prange(base.shape[0]):
        b = load(base, j)
        v0 = load(x0, j) - b
        v1 = load(x1, j) - b
        d0 = (v0 if abs(v0) >= (t0 if j < c0 else u0) else zero) * w0
        d1 = (v1 if abs(v1) >= (t1 if j < c1 else u1) else zero) * w1
        positive = d0 + d1 >= zero
        a0 = d0 > zero if positive else d0 < zero
        a1 = d1 > zero if positive else d1 < zero
        merged = (d0 if a0 else zero) + (d1 if a1 else zero)
        if normalize:
            divisor = (w0 if a0 else zero) + (w1 if a1 else zero)
            merged = merged / (divisor if divisor != zero else one)
        store(out, j, b + lam * merged)


@njit(parallel=True, nogil=True, cache=True)
def _many(xs, base, t, u, c, w, normalize, lam, out):
    """out = TIES of len(xs) task vectors, tile by tile (arguments as _pair's, one array entry per model)."""
    models, n = len(xs), base.shape[0]
    zero, one = np.float32(0.0), np.float32(1.0)
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        d = np.empty((models, _TILE), dtype=np.float32)
        total = np.empty(_TILE, dtype=np.float32)
        merged = np.empty(_TILE, dtype=np.float32)
        divisor = np.empty(_TILE, dtype=np.float32)
        stop = min(n, (blk + 1) * _BLOCK)
        for j0 in range(blk * _BLOCK, stop, _TILE):
            width = min(_TILE, stop - j0)
            for i in range(models):
                xi, di, ti, ui, ci, wi = xs[i], d[i], t[i], u[i], c[i], w[i]
                for s in range(width):
                    j = j0 + s
                    v = load(xi, j) - load(base, j)
                    di[s] = (v if abs(v) >= (ti if j < ci else ui) else zero) * wi
            for s in range(width):
                total[s] = d[0, s]
                merged[s] = zero
                divisor[s] = zero
            for i in range(1, models):
                for s in range(width):
                    total[s] += d[i, s]
            for i in range(models):
                di, wi = d[i], w[i]
                for s in range(width):
                    agree = di[s] > zero if total[s] >= zero else di[s] < zero
                    merged[s] += di[s] if agree else zero
                    divisor[s] += wi if agree else zero
            for s in range(width):
                m = merged[s]
                if normalize:
                    m = m / (divisor[s] if divisor[s] != zero else one)
                store(out, j0 + s, load(base, j0 + s) + lam * m)


def ties_into(xs: Sequence[Tensor], base: Tensor, thresholds: Sequence[float], cutoffs: Sequence[int],
              weights: Sequence[float], *, normalize: bool, lam: float, out: Tensor) -> None:
    """Write TIES of `xs` on `base` into `out`, each model's threshold and cut-off given.

    Args:
        xs: N tensors as stored (all bfloat16 or all float32, contiguous, CPU), base's shape.
        base: the base model's tensor, same dtype.
        thresholds: (N,) T_i, the k_i-th largest |x_i - base| as float32 (0 keeps every entry).
        cutoffs: (N,) c_i: entries equal to T_i are kept below flat index c_i (numel: all of them).
        weights: (N,) w_i.
        normalize, lam: TIES's shared parameters.
        out: base's shape, float32 or bfloat16, contiguous; may not overlap the inputs.
    """
    arrays = tuple(as_array(x) for x in xs)
    b, o = as_array(base), as_array(out)
    t = np.asarray(thresholds, dtype=np.float32)
    u = np.nextafter(t, np.float32(np.inf))  # |v| >= u  <=>  |v| > t
    c = np.asarray(cutoffs, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    if len(arrays) == 2:
        _pair(arrays[0], arrays[1], b, t[0], u[0], c[0], t[1], u[1], c[1], w[0], w[1], bool(normalize),
              np.float32(lam), o)
    else:
        _many(arrays, b, t, u, c, w, bool(normalize), np.float32(lam), o)
