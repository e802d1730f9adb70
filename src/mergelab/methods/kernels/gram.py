"""multislerp and karcher on the CPU in two compiled passes (numba), one thread, outside the GIL.

    gram:    G_ij = <v_i, v_j> of the vectors v_i = x_i - base (or x_i), read as stored
             (bfloat16 bits or float32), a pair of models at a time; v_i formed in float32
             as the reference forms it, products and sums in float64, one partial sum per block;
    combine: theta_j = sum_i k_i v_i[j] (+ base[j]) in float32, in model order, rounded
             to the output dtype in the same pass,

with the coefficients k from the same float64 code as the reference
(spherical.multislerp_weights, spherical.karcher_coefficients), run on G in between.
No float32 copies of the inputs and no (n, numel) temporaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels import one_thread
from mergelab.methods.kernels.io import as_array, load, store, usable
from mergelab.methods.kernels.linear import weighted_sum

__all__ = ["supports", "run", "gram"]

# Entries per float64 partial sum: fixed, so the sums do not depend on the number of threads.
_BLOCK = 1 << 16


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _block_sums(a, b, base, has_base, lo, hi):
    """(|a|^2, |b|^2, <a, b>) over [lo, hi) in float64, of a - base and b - base (rounded to float32)
    when has_base. Reassociation only touches these sums, so the loop runs in SIMD lanes."""
    aa, bb, ab = 0.0, 0.0, 0.0
    if has_base:
        for j in range(lo, hi):
            c = load(base, j)
            x, y = np.float64(load(a, j) - c), np.float64(load(b, j) - c)
            aa += x * x
            bb += y * y
            ab += x * y
    else:
        for j in range(lo, hi):
            x, y = np.float64(load(a, j)), np.float64(load(b, j))
            aa += x * x
            bb += y * y
            ab += x * y
    return aa, bb, ab


@njit(parallel=True, nogil=True, cache=True)
def _pair_sums(a, b, base, has_base):
    """(blocks, 3) float64 partial sums (|a|^2, |b|^2, <a, b>), one row per _BLOCK entries."""
    size = a.shape[0]
    blocks = (size + _BLOCK - 1) // _BLOCK
    out = np.zeros((blocks, 3), dtype=np.float64)
    for blk in prange(blocks):
        lo = blk * _BLOCK
        aa, bb, ab = _block_sums(a, b, base, has_base, lo, min(size, lo + _BLOCK))
        out[blk, 0] = aa
        out[blk, 1] = bb
        out[blk, 2] = ab
    return out


@njit(parallel=True, nogil=True, cache=True)
def _combine_base(rows, coef, base, out):
    """out[j] = sum_i coef[i] (rows[i][j] - base[j]) + base[j] in float32, model order."""
    size = out.shape[0]
    for blk in prange((size + _BLOCK - 1) // _BLOCK):  # blocks: numba's parfor pass rejects the flat form
        for j in range(blk * _BLOCK, min(size, (blk + 1) * _BLOCK)):
            c = load(base, j)
            acc = (load(rows[0], j) - c) * coef[0]
            for i in range(1, len(rows)):
                acc += (load(rows[i], j) - c) * coef[i]
            store(out, j, acc + c)


def gram(xs: Sequence[Tensor], base: Tensor | None = None) -> Tensor:
    """G_ij = <v_i, v_j> (float64 (n, n) tensor) of v_i = xs[i] - base (or xs[i]), as stored.

    One pass over each pair of models (for two models, the common case: one pass in all); a kernel
    of two arrays compiles once per dtype, whatever the number of models.
    """
    rows = [as_array(t) for t in xs]
    b = as_array(base) if base is not None else rows[0][:0]
    n = len(rows)
    g = np.zeros((n, n), dtype=np.float64)
    pairs = [(i, k) for i in range(n) for k in range(i + 1, n)] or [(0, 0)]
    with one_thread():
        for i, k in pairs:
            aa, bb, ab = _pair_sums(rows[i], rows[k], b, base is not None).sum(axis=0)
            g[i, k] = g[k, i] = ab
            g[i, i], g[k, k] = aa, bb  # the same sums, in the same order, from any pair
    return torch.from_numpy(g)


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s, *, method: str) -> bool:
    """Two or more models on the CPU (and a base for multislerp, if any), all bfloat16 or all float32."""
    used = [*xs, base] if method == "multislerp" and base is not None else list(xs)
    return len(xs) >= 2 and xs[0].numel() > 0 and usable(used)


def run(xs: Sequence[Tensor], base: Tensor | None, p, s, gen, out_dtype: torch.dtype, *, method: str) -> Tensor:
    """multislerp or karcher (methods/spherical.py) of the tensors as stored, rounded to out_dtype."""
    from mergelab.methods.spherical import karcher_coefficients, multislerp_weights

    if method == "karcher":
        base = None  # karcher takes no base
        coef = karcher_coefficients(gram(xs), s.max_iter, s.tol, torch.float32)
    else:
        coef = multislerp_weights(gram(xs, base), p.tensor("weight", torch.empty(0)), s)
    k = coef.numpy().astype(np.float32)
    if base is None:
        return weighted_sum(list(xs), k, out_dtype).reshape(xs[0].shape)
    out = torch.empty(base.numel(), dtype=torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
    with one_thread():
        _combine_base(tuple(as_array(t) for t in xs), k, as_array(base), as_array(out))
    return out.reshape(base.shape).to(out_dtype)
