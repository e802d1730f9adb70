"""The weighted sum of linear merging on the CPU in one compiled pass (numba), one thread, outside the GIL.

out[j] = sum_i w_i x_i[j], read in the storage dtype (bfloat16 bits or float32),
summed in float32 registers in model order, and written in the output dtype
(bfloat16 rounded to nearest even, as torch rounds, or float32). One read of
each input and one write of the output: no float32 copies, no conversion pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels import one_thread
from mergelab.methods.kernels.io import as_array, load, store, store_dtype, usable

__all__ = ["available", "weighted_sum", "supports", "run", "into"]

_BLOCK = 1 << 16


@njit(parallel=True, nogil=True, cache=True)
def _weighted_sum_pair(x, weights, out):
    x0, x1 = x[0], x[1]
    w0, w1 = weights[0], weights[1]
    for j in prange(out.shape[0]):
        store(out, j, load(x0, j) * w0 + load(x1, j) * w1)


@njit(parallel=True, nogil=True, cache=True)
def _weighted_sum(x, weights, out):
    n = out.shape[0]
    for blk in prange((n + _BLOCK - 1) // _BLOCK):  # blocks: numba's parfor pass rejects the flat form
        for j in range(blk * _BLOCK, min(n, (blk + 1) * _BLOCK)):
            acc = load(x[0], j) * weights[0]
            for i in range(1, len(x)):
                acc += load(x[i], j) * weights[i]
            store(out, j, acc)


def available(x: Sequence[Tensor]) -> bool:
    """Whether the kernel can run on these rows: CPU, contiguous, all bfloat16 or all float32."""
    return len(x) > 0 and usable(list(x))


def weighted_sum(x: Sequence[Tensor], weights: Sequence[float], out_dtype: torch.dtype | None = None, *,
                 out: Tensor | None = None) -> Tensor:
    """sum_i weights[i] * x[i] for N tensors of one shape; float32 result unless out_dtype says otherwise.

    out: a contiguous CPU tensor of x's shape, float32 or bfloat16, written in place and returned
    (a search writes each candidate straight into the evaluated model's parameters).
    """
    shape = x[0].shape
    written = out.dtype if out is not None else store_dtype(out_dtype)
    out = torch.empty(shape, dtype=written) if out is None else out
    if out.numel():
        rows = tuple(as_array(t) for t in x)
        w = np.asarray(weights, dtype=np.float32)
        with one_thread():
            (_weighted_sum_pair if len(rows) == 2 else _weighted_sum)(rows, w, as_array(out))
    return out if out_dtype is None or out_dtype == written else out.to(out_dtype)


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """The linear method's kernel applies to CPU rows all bfloat16 or all float32."""
    return available(xs)


def run(xs: Sequence[Tensor], base: Tensor | None, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """linear (methods/linear.py) on the rows as stored, rounded to out_dtype in the same pass."""
    from mergelab.methods.primitives import linear_weights

    return weighted_sum(list(xs), linear_weights(p, s), out_dtype)


def into(xs: Sequence[Tensor], base: Tensor | None, p, s, out: Tensor, state=None) -> None:
    """run()'s numbers written into `out` (the rows' shape, float32 or bfloat16, contiguous CPU); no state."""
    from mergelab.methods.primitives import linear_weights

    weighted_sum(list(xs), linear_weights(p, s), out=out)
