"""SCE without variance selection (select_topk 1) on the CPU in two compiled passes (numba).

One thread, outside the GIL (see kernels/__init__.py, "Threads").

    squares: sum_j tau_ij^2 per model, tau_i = x_i - base in float32, summed in float64;
    combine: per entry, elect the sign of sum_i tau_i, then the eta-weighted disjoint
             mean of the agreeing entries, plus the base, rounded to the output dtype,

with the float32 operations of the reference (methods/sce.py) in its order and
the weights from the same float64 formula (sce.weights_from_squares). With
select_topk < 1 the reference runs (its variance ranking is not compiled).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels import one_thread
from mergelab.methods.kernels.io import as_array, load, store, store_dtype, usable

__all__ = ["supports", "run"]

_BLOCK = 1 << 20  # entries per float64 partial sum: fixed, so the sums do not depend on the thread count
_ONE, _ZERO = np.float32(1.0), np.float32(0.0)


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _block_squares(x, base):
    """sum_j (x_j - base_j)^2 of one block, the difference in float32, the sum in float64 (SIMD lanes)."""
    acc = 0.0
    for j in range(base.shape[0]):
        d = np.float64(load(x, j) - load(base, j))
        acc += d * d
    return acc


@njit(parallel=True, nogil=True, cache=True)
def _squares(xs, base):
    """(blocks, models) float64 partial sums of (x_i - base)^2, one row per _BLOCK entries."""
    n, models = base.shape[0], len(xs)
    blocks = (n + _BLOCK - 1) // _BLOCK
    out = np.zeros((blocks, models), dtype=np.float64)
    for blk in prange(blocks):
        lo = blk * _BLOCK
        hi = min(n, lo + _BLOCK)
        for i in range(models):
            out[blk, i] = _block_squares(xs[i][lo:hi], base[lo:hi])
    return out


@njit(parallel=True, nogil=True, cache=True)
def _combine(xs, base, weights, out):
    n, models = base.shape[0], len(xs)
    for blk in prange((n + _COMBINE_BLOCK - 1) // _COMBINE_BLOCK):  # blocks: a loop over xs in a flat prange fails
        tv = np.empty(models, dtype=np.float32)
        for j in range(blk * _COMBINE_BLOCK, min(n, (blk + 1) * _COMBINE_BLOCK)):
            b = load(base, j)
            total = _ZERO
            for i in range(models):
                tv[i] = load(xs[i], j) - b
                total = tv[i] if i == 0 else total + tv[i]
            positive = total >= 0  # elected before weighting, as the reference does
            merged, agreeing = _ZERO, _ZERO
            for i in range(models):
                r = tv[i] * weights[i]
                if (r > 0) if positive else (r < 0):
                    merged += r
                    agreeing += weights[i]
            store(out, j, b + merged / (agreeing if agreeing != 0 else _ONE))


_COMBINE_BLOCK = 1 << 16


@njit(parallel=True, nogil=True, cache=True)
def _combine_pair(x0, x1, base, w0, w1, out):
    """_combine for two models, a flat loop without scratch arrays (the compiler vectorises it)."""
    for j in prange(base.shape[0]):
        b = load(base, j)
        t0 = load(x0, j) - b
        t1 = load(x1, j) - b
        positive = t0 + t1 >= 0
        r0 = t0 * w0
        r1 = t1 * w1
        a0 = r0 > 0 if positive else r0 < 0
        a1 = r1 > 0 if positive else r1 < 0
        merged = (r0 if a0 else _ZERO) + (r1 if a1 else _ZERO)
        agreeing = (w0 if a0 else _ZERO) + (w1 if a1 else _ZERO)
        store(out, j, b + merged / (agreeing if agreeing != 0 else _ONE))


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """select_topk 1, CPU inputs all bfloat16 or all float32."""
    return base is not None and len(xs) > 0 and s.select_topk >= 1 and usable([*xs, base])


def run(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """sce (methods/sce.py) on the inputs as stored, rounded to out_dtype in the combining pass."""
    from mergelab.methods.primitives import weights_from_squares

    out = torch.empty(base.numel(), dtype=store_dtype(out_dtype))
    if base.numel():
        rows, b = tuple(as_array(t) for t in xs), as_array(base)
        with one_thread():
            squares = [float(v) for v in _squares(rows, b).sum(axis=0)]
            weights = weights_from_squares(squares, base.numel()).numpy()
            if len(rows) == 2:
                _combine_pair(rows[0], rows[1], b, weights[0], weights[1], as_array(out))
            else:
                _combine(rows, b, weights, as_array(out))
    return out.reshape(base.shape).to(out_dtype)
