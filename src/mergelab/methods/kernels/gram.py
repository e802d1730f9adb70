"""Gram matrices of (task) vectors on the CPU in one compiled pass (numba), one thread, outside the GIL.

nuslerp and model_stock first need, for each vector they interpolate (the whole
tensor, or each row or column), the norms and mutual dot products of the
vectors v_i = x_i - base (or x_i without a base), and then one combination
pass. This module gives both passes their shared first half:

    gram:    G[r, i, k] = sum_j v_i[r, j] v_k[r, j] for i <= k, over the rows r of a
             (rows, cols) view of the inputs, or over its columns (G[c, i, k], summed
             down the rows); v_i in float32 from the inputs as stored (bfloat16 bits or
             float32), exactly as the reference's float32 subtraction, the sums in float64.

The float64 sums are rounded once to float32 before the methods' coefficient
formulas, which the reference and the kernel share, so a kernel differs from the
reference only by the order and precision of these sums (the reference sums in
float32): within float32 rounding of a reduction.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergelab.methods.kernels.io import load

__all__ = ["gram_rows", "gram_cols"]

# Entries per block: the float32 differences of one block stay in cache for the dot products.
_BLOCK = 4096


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _block_dot(a, b, n):
    """sum_{j < n} a_j b_j in float64; reassociation only touches this sum, so it runs in SIMD lanes."""
    acc = 0.0
    for j in range(n):
        acc += np.float64(a[j]) * np.float64(b[j])
    return acc


@njit(nogil=True, cache=True)
def _differences(xs, base, has_base, lo, n, tau):
    """tau[i, :n] = x_i[lo:lo+n] - base[lo:lo+n] in float32 (or x_i alone without a base)."""
    for i in range(len(xs)):
        x = xs[i]
        if has_base:
            for j in range(n):
                tau[i, j] = load(x, lo + j) - load(base, lo + j)
        else:
            for j in range(n):
                tau[i, j] = load(x, lo + j)


@njit(nogil=True, cache=True)
def gram_rows(xs, base, has_base, rows, cols):
    """(rows, N, N) float64: G[r, i, k] = <v_i[r], v_k[r]> (i <= k; the lower triangle is left 0).

    xs: tuple of N flat arrays (rows * cols entries, row-major); base: a flat array of the same
    kind (ignored unless has_base). Each row is summed a block at a time, the blocks in order
    (within a block in SIMD lanes), on the calling thread: the sums do not depend on threads.
    """
    models = len(xs)
    out = np.zeros((rows, models, models), dtype=np.float64)
    tau = np.empty((models, _BLOCK), dtype=np.float32)
    for r in range(rows):
        for lo in range(0, cols, _BLOCK):
            n = min(_BLOCK, cols - lo)
            _differences(xs, base, has_base, r * cols + lo, n, tau)
            for i in range(models):
                for k in range(i, models):
                    out[r, i, k] += _block_dot(tau[i], tau[k], n)
    return out


@njit(nogil=True, cache=True)
def gram_cols(xs, base, has_base, rows, cols):
    """(cols, N, N) float64: G[c, i, k] = sum_r v_i[r, c] v_k[r, c] (i <= k), summed down the rows in order."""
    models = len(xs)
    acc = np.zeros((models, models, cols), dtype=np.float64)
    tau = np.empty((models, cols), dtype=np.float32)
    for r in range(rows):
        _differences(xs, base, has_base, r * cols, cols, tau)
        for i in range(models):
            for k in range(i, models):
                for c in range(cols):  # independent columns: vectorised without reassociation
                    acc[i, k, c] += np.float64(tau[i, c]) * np.float64(tau[k, c])
    out = np.zeros((cols, models, models), dtype=np.float64)
    for c in range(cols):
        for i in range(models):
            for k in range(i, models):
                out[c, i, k] = acc[i, k, c]
    return out
