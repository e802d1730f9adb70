"""SLERP of two tensors on the CPU in two compiled passes (numba), one thread, outside the GIL.

    sums:    |a|^2, |b|^2 and <a, b> over the flattened tensors, read as stored
             (bfloat16 bits or float32), accumulated in float64 per block;
    combine: theta_j = c0 a_j + c1 b_j in float32 (two products, one sum, no fused
             multiply-add), rounded to the output dtype in the same pass,

with c0, c1 from the same float32 formula as the reference
(spherical.flat_slerp_coefficients). The reference sums in float64 too, in
another order, so the coefficients agree but for a last-bit tie in rare cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels import one_thread
from mergelab.methods.kernels.gram import _pair_block
from mergelab.methods.kernels.io import as_array, load, store, store_dtype, usable

__all__ = ["supports", "run"]

# Entries per float64 partial sum. Fixed (not one block per thread), so the sums, and the
# coefficients, do not depend on how many threads run.
_BLOCK = 1 << 20


@njit(parallel=True, nogil=True, cache=True)
def _sums(a, b):
    """(blocks, 3) float64 partial sums of a*a, b*b, a*b, one row per _BLOCK entries."""
    n = a.shape[0]
    blocks = (n + _BLOCK - 1) // _BLOCK
    out = np.zeros((blocks, 3), dtype=np.float64)
    for blk in prange(blocks):
        lo = blk * _BLOCK
        hi = min(n, lo + _BLOCK)
        aa, bb, ab = _pair_block(a[lo:hi], b[lo:hi], a[lo:hi], False)  # (|a|^2, |b|^2, <a, b>), float64
        out[blk, 0] = aa
        out[blk, 1] = bb
        out[blk, 2] = ab
    return out


@njit(parallel=True, nogil=True, cache=True)
def _combine(a, b, c0, c1, out):
    # A flat loop: the compiler vectorises it (7x faster than 64k-entry blocks with an inner loop).
    for j in prange(out.shape[0]):
        store(out, j, load(a, j) * c0 + load(b, j) * c1)


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """CPU tensors, base and one other model, all bfloat16 or all float32."""
    return base is not None and len(xs) == 1 and usable([base, *xs])


def run(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """slerp (methods/spherical.py) of base and xs[0] as stored, rounded to out_dtype in the same pass."""
    from mergelab.methods.primitives import flat_slerp_coefficients

    out = torch.empty(base.numel(), dtype=store_dtype(out_dtype))
    if base.numel():
        a, b = as_array(base), as_array(xs[0])
        with one_thread():
            aa, bb, ab = (float(v) for v in _sums(a, b).sum(axis=0))
            c0, c1 = flat_slerp_coefficients(s.t, aa, bb, ab)
            _combine(a, b, np.float32(c0), np.float32(c1), as_array(out))
    return out.reshape(base.shape).to(out_dtype)
