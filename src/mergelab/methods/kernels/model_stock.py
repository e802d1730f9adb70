"""Model Stock on the CPU in two compiled passes (numba), one thread, outside the GIL.

    gram:    |tau_i|^2 and <tau_i, tau_j> per vector (the whole tensor, or each row with
             filter_wise), tau_i = x_i - base in float32, summed in float64 (kernels/gram.py);
    combine: theta = t * mean_i x_i + (1 - t) * base in float32, the mean summed in model
             order and divided by N, rounded to the output dtype in the same pass,

with t from the float32 formula the reference uses (linear.model_stock_ratio). The
reference sums in float32 (and torch's mean may add more than two models in another
order), so the two agree to float32 rounding of a sum. No float32 copy of an input,
no task-vector tensor: two reads of each input and one write.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit
from torch import Tensor

from mergelab.methods.kernels.gram import gram_rows
from mergelab.methods.kernels.io import as_array, load, store, store_dtype, usable

__all__ = ["supports", "run"]


@njit(nogil=True, cache=True)
def _segment(xs, lo, base, a, b, out):
    """out = a * (sum_i x_i) / N + b * base over one segment (xs read from lo on; a = t, b = 1 - t),
    the models summed in order."""
    count = np.float32(len(xs))
    for j in range(out.shape[0]):
        acc = load(xs[0], lo + j)
        for i in range(1, len(xs)):
            acc += load(xs[i], lo + j)
        store(out, j, a * (acc / count) + b * load(base, j))


@njit(nogil=True, cache=True)
def _segment_pair(x0, x1, base, a, b, out):
    """The same for two models (the usual case), written out so that the loop vectorises; the
    mean's division by 2 is a product with 0.5 (bit for bit the same: a power of two)."""
    half = np.float32(0.5)
    for j in range(out.shape[0]):
        store(out, j, a * ((load(x0, j) + load(x1, j)) * half) + b * load(base, j))


@njit(nogil=True, cache=True)
def _combine(xs, base, t, one_minus_t, cols, out):
    """theta = t * mean_i x_i + (1 - t) * base, one t per row of a (rows, cols) layout."""
    for r in range(t.shape[0]):
        lo, hi = r * cols, (r + 1) * cols
        if len(xs) == 2:
            _segment_pair(xs[0][lo:hi], xs[1][lo:hi], base[lo:hi], t[r], one_minus_t[r], out[lo:hi])
        else:
            _segment(xs, lo, base[lo:hi], t[r], one_minus_t[r], out[lo:hi])


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """CPU tensors, all bfloat16 or all float32, contiguous, at least one entry; filter_wise on >= 1 dimension."""
    return (base is not None and len(xs) >= 2 and base.numel() > 0 and (not s.filter_wise or base.dim() >= 1)
            and usable([base, *xs]))


def run(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """model_stock (methods/linear.py) of the inputs as stored, rounded to out_dtype in the same pass."""
    from mergelab.methods.primitives import model_stock_ratio

    shape, n = base.shape, len(xs)
    cols = shape[-1] if s.filter_wise else base.numel()
    rows = base.numel() // cols
    rows_x = tuple(as_array(x) for x in xs)
    b = as_array(base)
    out = torch.empty(shape, dtype=store_dtype(out_dtype))
    g = gram_rows(rows_x, b, True, rows, cols)  # (rows, N, N)
    norms = torch.from_numpy(np.sqrt(np.stack([g[:, i, i] for i in range(n)]))).to(torch.float32)
    dots = torch.from_numpy(np.stack([g[:, i, j] for i in range(n) for j in range(i + 1, n)])).to(torch.float32)
    t = model_stock_ratio(norms, dots)  # (rows,)
    _combine(rows_x, b, t.numpy(), (1 - t).numpy(), cols, as_array(out))
    return out.to(out_dtype)
