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
from numba import njit
from torch import Tensor

from mergelab.methods.kernels.gram import gram_cols, gram_rows
from mergelab.methods.kernels.io import as_array, load, store, store_dtype, usable

__all__ = ["supports", "run", "layout"]


@njit(nogil=True, cache=True)
def _segment(x0, x1, base, has_base, a, b, out):
    """out = base + (a v0 + b v1) over one contiguous segment, a and b one vector's coefficients.
    Plain loops over slices: LLVM vectorises them."""
    if has_base:
        for j in range(out.shape[0]):
            z = load(base, j)
            store(out, j, z + (a * (load(x0, j) - z) + b * (load(x1, j) - z)))
    else:
        for j in range(out.shape[0]):
            store(out, j, a * load(x0, j) + b * load(x1, j))


@njit(nogil=True, cache=True)
def _segment_per_entry(x0, x1, base, has_base, a, b, out):
    """The same with a[j], b[j] per entry (one row of a layout whose vectors are its columns)."""
    if has_base:
        for j in range(out.shape[0]):
            z = load(base, j)
            store(out, j, z + (a[j] * (load(x0, j) - z) + b[j] * (load(x1, j) - z)))
    else:
        for j in range(out.shape[0]):
            store(out, j, a[j] * load(x0, j) + b[j] * load(x1, j))


@njit(nogil=True, cache=True)
def _combine_rows(x0, x1, base, has_base, c0, c1, cols, out):
    """One coefficient pair per row of a (rows, cols) layout."""
    for r in range(c0.shape[0]):
        lo, hi = r * cols, (r + 1) * cols
        _segment(x0[lo:hi], x1[lo:hi], base[lo:hi], has_base, c0[r], c1[r], out[lo:hi])


@njit(nogil=True, cache=True)
def _combine_cols(x0, x1, base, has_base, c0, c1, rows, out):
    """One coefficient pair per column (vectors along dim 0)."""
    cols = c0.shape[0]
    for r in range(rows):
        lo, hi = r * cols, (r + 1) * cols
        _segment_per_entry(x0[lo:hi], x1[lo:hi], base[lo:hi], has_base, c0, c1, out[lo:hi])


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
    from mergelab.methods.primitives import nuslerp_coefficients, nuslerp_t

    shape = xs[0].shape
    rows, cols, per_col = layout(shape, flatten=s.nuslerp_flatten, row_wise=s.nuslerp_row_wise)
    x0, x1 = as_array(xs[0]), as_array(xs[1])
    has_base = base is not None
    b = as_array(base) if has_base else x0  # not read without a base
    out = torch.empty(shape, dtype=store_dtype(out_dtype))
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
