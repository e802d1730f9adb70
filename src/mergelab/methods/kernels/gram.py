"""Gram matrices of (task) vectors on the CPU in one compiled pass (numba), one thread, outside the GIL.

nuslerp and model_stock first need, for each vector they interpolate (the whole
tensor, or each row or column), the norms and mutual dot products of the
vectors v_i = x_i - base (or x_i without a base), and then one combination
pass. This module gives both their shared first pass:

    G[r, i, k] = sum_j v_i[r, j] v_k[r, j]   (i <= k; the lower triangle is left 0)

over the rows r of a row-major (rows, cols) view of the inputs (gram_rows), or
over its columns, summed down the rows (gram_cols), or over the whole tensors (gram,
for multislerp and karcher: kernels/spherical_mean.py); v_i in float32 from the
inputs as stored (bfloat16 bits or float32), exactly as the reference's float32
subtraction, the products and sums in float64.

The float64 sums are rounded once to float32 before the methods' coefficient
formulas, which the reference and the kernel share, so a kernel differs from the
reference only by the order and precision of these sums (the reference sums in
float32): within float32 rounding of a reduction.

Loops run over array slices (contiguous, so LLVM vectorises them); a row longer
than _BLOCK is summed a block at a time, the blocks in order, so the sums depend
neither on the thread count nor on where a row starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit

from mergelab.methods.kernels.io import as_array, load

__all__ = ["gram", "gram_rows", "gram_cols"]

_BLOCK = 1 << 16  # entries per float64 partial sum along a row
_SCRATCH = 4096  # entries per block of float32 differences (N > 2 models)


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _pair_block(x0, x1, base, has_base):
    """(<v0, v0>, <v1, v1>, <v0, v1>) of one block in float64; reassociation only touches these
    sums, so the loop runs in SIMD lanes."""
    aa, bb, ab = 0.0, 0.0, 0.0
    if has_base:
        for j in range(x0.shape[0]):
            z = load(base, j)
            p, q = np.float64(load(x0, j) - z), np.float64(load(x1, j) - z)
            aa += p * p
            bb += q * q
            ab += p * q
    else:
        for j in range(x0.shape[0]):
            p, q = np.float64(load(x0, j)), np.float64(load(x1, j))
            aa += p * p
            bb += q * q
            ab += p * q
    return aa, bb, ab


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _block_dot(a, b):
    """sum_j a_j b_j of two float32 arrays in float64 (SIMD lanes)."""
    acc = 0.0
    for j in range(a.shape[0]):
        acc += np.float64(a[j]) * np.float64(b[j])
    return acc


@njit(nogil=True, cache=True)
def _differences(x, base, has_base, out):
    """out = x - base in float32 (x alone without a base); x, base, out of one length."""
    if has_base:
        for j in range(out.shape[0]):
            out[j] = load(x, j) - load(base, j)
    else:
        for j in range(out.shape[0]):
            out[j] = load(x, j)


@njit(nogil=True, cache=True)
def gram_rows(xs, base, has_base, rows, cols):
    """(rows, N, N) float64 Gram matrix of each row's vectors v_i = x_i - base (or x_i).

    xs: a tuple of N flat arrays of rows * cols entries (row-major); base: a flat array of the
    same kind (not read unless has_base).
    """
    models = len(xs)
    out = np.zeros((rows, models, models), dtype=np.float64)
    if models == 2:
        x0, x1 = xs[0], xs[1]
        for r in range(rows):
            for lo in range(r * cols, (r + 1) * cols, _BLOCK):
                hi = min((r + 1) * cols, lo + _BLOCK)
                aa, bb, ab = _pair_block(x0[lo:hi], x1[lo:hi], base[lo:hi] if has_base else x0[lo:hi], has_base)
                out[r, 0, 0] += aa
                out[r, 1, 1] += bb
                out[r, 0, 1] += ab
        return out
    tau = np.empty((models, _SCRATCH), dtype=np.float32)
    for r in range(rows):
        for lo in range(r * cols, (r + 1) * cols, _SCRATCH):
            hi = min((r + 1) * cols, lo + _SCRATCH)
            for i in range(models):
                _differences(xs[i][lo:hi], base[lo:hi] if has_base else xs[i][lo:hi], has_base, tau[i, :hi - lo])
            for i in range(models):
                for k in range(i, models):
                    out[r, i, k] += _block_dot(tau[i, :hi - lo], tau[k, :hi - lo])
    return out


@njit(nogil=True, cache=True)
def _accumulate_cols(a, b, acc):
    """acc[c] += a[c] * b[c] in float64: independent columns, vectorised without reassociation."""
    for c in range(acc.shape[0]):
        acc[c] += np.float64(a[c]) * np.float64(b[c])


@njit(nogil=True, cache=True)
def gram_cols(xs, base, has_base, rows, cols):
    """(cols, N, N) float64: G[c, i, k] = sum_r v_i[r, c] v_k[r, c] (i <= k), summed down the rows in order."""
    models = len(xs)
    acc = np.zeros((models, models, cols), dtype=np.float64)
    tau = np.empty((models, cols), dtype=np.float32)
    for r in range(rows):
        lo, hi = r * cols, (r + 1) * cols
        for i in range(models):
            _differences(xs[i][lo:hi], base[lo:hi] if has_base else xs[i][lo:hi], has_base, tau[i])
        for i in range(models):
            for k in range(i, models):
                _accumulate_cols(tau[i], tau[k], acc[i, k])
    out = np.zeros((cols, models, models), dtype=np.float64)
    for i in range(models):
        for k in range(i, models):
            out[:, i, k] = acc[i, k]
    return out


def gram(xs: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """G_ik = <v_i, v_k>, an (n, n) symmetric float64 tensor, of v_i = xs[i] - base (or xs[i]) over
    whole tensors (contiguous CPU, all bfloat16 or all float32, as stored)."""
    rows = tuple(as_array(t) for t in xs)
    b = as_array(base) if base is not None else rows[0]  # not read without a base
    upper = gram_rows(rows, b, base is not None, 1, rows[0].shape[0])[0]
    return torch.from_numpy(upper + np.triu(upper, 1).T)
