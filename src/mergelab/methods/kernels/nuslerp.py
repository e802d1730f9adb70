"""NuSLERP of two tensors on the CPU in two compiled passes (numba), one thread, outside the GIL.

    gram:    |v_1|^2, |v_2|^2 and <v_1, v_2> per vector (the whole tensor, each row, or
             each column), v_i = x_i - base in float32 (x_i without a base), summed in
             float64 (kernels/gram.py);
    combine: theta = base + (c_1 v_1 + c_2 v_2) in float32 (two products, one sum, no fused
             multiply-add, then the base), rounded to the output dtype in the same pass,

with c_1, c_2 from the float32 formula the reference uses (spherical.nuslerp_coefficients).
The reference sums in float32, so the two agree to float32 rounding of a sum. No float32
copy of an input, no task-vector tensor: two reads of each input and one write.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels import one_thread
from mergelab.methods.kernels.gram import gram_cols, gram_rows
from mergelab.methods.kernels.io import as_array, load, store, usable

__all__ = ["supports", "run", "layout"]


@njit(parallel=True, nogil=True, cache=True)
def _combine_rows(x0, x1, base, has_base, c0, c1, cols, out):
    """out[r, j] = base + (c0[r] v0 + c1[r] v1) for a (rows, cols) layout, one coefficient pair per row."""
    for r in range(c0.shape[0]):
        a, b, lo = c0[r], c1[r], r * cols
        if has_base:
            for j in prange(lo, lo + cols):
                z = load(base, j)
                store(out, j, z + (a * (load(x0, j) - z) + b * (load(x1, j) - z)))
        else:
            for j in prange(lo, lo + cols):
                store(out, j, a * load(x0, j) + b * load(x1, j))


@njit(parallel=True, nogil=True, cache=True)
def _combine_cols(x0, x1, base, has_base, c0, c1, rows, out):
    """The same with one coefficient pair per column (vectors along dim 0)."""
    cols = c0.shape[0]
    for r in range(rows):
        lo = r * cols
        if has_base:
            for c in prange(cols):
                j = lo + c
                z = load(base, j)
                store(out, j, z + (c0[c] * (load(x0, j) - z) + c1[c] * (load(x1, j) - z)))
        else:
            for c in prange(cols):
                j = lo + c
                store(out, j, c0[c] * load(x0, j) + c1[c] * load(x1, j))


def layout(shape: torch.Size, *, flatten: bool, row_wise: bool) -> tuple[int, int, bool]:
    """(rows, cols, per_column): the tensor as a row-major (rows, cols) matrix whose rows (or columns,
    when per_column) are the vectors nuslerp interpolates one by one."""
    numel = math.prod(shape)
    if flatten or len(shape) <= 1:  # a vector is one vector, whichever dimension is named
        return 1, numel, False
    if row_wise:  # vectors along dim 0: the columns of (shape[0], rest)
        return shape[0], numel // shape[0], True
    return numel // shape[-1], shape[-1], False


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """Two CPU tensors (and a base, if any), all bfloat16 or all float32, contiguous, at least one entry."""
    tensors = [*xs] if base is None else [base, *xs]
    return len(xs) == 2 and xs[0].numel() > 0 and (s.nuslerp_flatten or xs[0].dim() >= 1) and usable(tensors)


def run(xs: Sequence[Tensor], base: Tensor | None, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """nuslerp (methods/spherical.py) of the inputs as stored, rounded to out_dtype in the same pass."""
    from mergelab.methods.spherical import nuslerp_coefficients, nuslerp_t

    shape = xs[0].shape
    rows, cols, per_col = layout(shape, flatten=s.nuslerp_flatten, row_wise=s.nuslerp_row_wise)
    x0, x1 = as_array(xs[0]), as_array(xs[1])
    has_base = base is not None
    b = as_array(base) if has_base else x0  # not read without a base
    out = torch.empty(shape, dtype=torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
    with one_thread():
        g = (gram_cols if per_col else gram_rows)((x0, x1), b, has_base, rows, cols)
        n0, n1, dot = (torch.from_numpy(v).to(torch.float32)
                       for v in (np.sqrt(g[:, 0, 0]), np.sqrt(g[:, 1, 1]), g[:, 0, 1]))
        c0, c1 = nuslerp_coefficients(nuslerp_t(p), n0, n1, dot)
        c0, c1 = c0.numpy(), c1.numpy()
        if per_col:
            _combine_cols(x0, x1, b, has_base, c0, c1, rows, as_array(out))
        else:
            _combine_rows(x0, x1, b, has_base, c0, c1, cols, as_array(out))
    return out.to(out_dtype)
