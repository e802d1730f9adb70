"""MagMax on the CPU in one compiled pass (numba).

Per entry j, from the inputs as stored (bfloat16 bits or float32), in the reference's float32
operations and order (methods/magmax.py):

    best = theta_0[j] - theta_base[j];  for i >= 1: tau = theta_i[j] - theta_base[j],
    best = tau if |tau| >= |best|;       out[j] = round(theta_base[j] + lambda * best)

One read of every input and one write, where the torch fold makes a task vector, two absolute
values and a select per model. Marczak et al., ECCV 2024, arXiv:2407.06322.
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

_BLOCK = 1 << 16


@njit(parallel=True, nogil=True, cache=True)
def _magmax(xs, base, lam, out):
    n = base.shape[0]
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        for j in range(blk * _BLOCK, min(n, (blk + 1) * _BLOCK)):
            b = load(base, j)
            best = load(xs[0], j) - b
            for i in range(1, len(xs)):
                tau = load(xs[i], j) - b
                if abs(tau) >= abs(best):
                    best = tau
            store(out, j, b + lam * best)


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """CPU inputs all bfloat16 or all float32, and a base."""
    return base is not None and len(xs) > 0 and usable([*xs, base])


def run(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """magmax (methods/magmax.py) on the inputs as stored, rounded to out_dtype in the pass."""
    written = store_dtype(out_dtype)
    out = torch.empty(base.shape, dtype=written)
    if out.numel():
        with one_thread():  # a streaming pass: one thread each, as the other elementwise kernels
            _magmax(tuple(as_array(t) for t in xs), as_array(base), np.float32(s.lambda_), as_array(out))
    return out if out_dtype == written else out.to(out_dtype)
