"""Nearswap on the CPU in one compiled pass (numba).

Per entry j, from the inputs as stored (bfloat16 bits or float32), the reference's float32
operations in its order (methods/linear.py: torch evaluates t / a as reciprocal(a) * t):

    a      = max(|base_j - v_j|, 1e-6)
    w      = clamp((1 / a) * t, 0, 1)
    out[j] = round(w * v_j + (1 - w) * base_j)

One read of both inputs and one write, where the reference makes six float32 temporaries.
Nearswap as defined by MergeKit (alchemonaut, QuartetAnemoi-70B-t0.0001, 2024).
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

_FLOOR = np.float32(1e-6)  # torch's clamp_min(1e-6) on float32 compares with float32(1e-6)


@njit(parallel=True, nogil=True, cache=True)
def _nearswap(v, base, t, out):
    zero, one = np.float32(0.0), np.float32(1.0)
    for j in prange(base.shape[0]):
        b = load(base, j)
        x = load(v, j)
        a = abs(b - x)
        a = a if a > _FLOOR else _FLOOR
        w = (one / a) * t
        w = zero if w < zero else (one if w > one else w)
        store(out, j, w * x + (one - w) * b)


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """One model and a base on the CPU, all bfloat16 or all float32."""
    return base is not None and len(xs) == 1 and usable([xs[0], base])


def run(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """nearswap (methods/linear.py) on the inputs as stored, rounded to out_dtype in the same pass."""
    written = store_dtype(out_dtype)
    out = torch.empty(base.shape, dtype=written)
    if out.numel():
        with one_thread():  # a streaming pass, one thread (kernels/__init__.py)
            _nearswap(as_array(xs[0]), as_array(base), np.float32(s.t), as_array(out))
    return out if out_dtype == written else out.to(out_dtype)
