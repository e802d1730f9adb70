"""Task arithmetic on the CPU in one compiled pass (numba).

The readable method (methods/task_arithmetic.py) stacks the models into a float32
(N, *shape) tensor, then makes each task vector, scales it, sums, divides, scales by
lambda and adds the base: five float32 temporaries and as many passes. Here, per
entry j, from the inputs as stored (bfloat16 bits or float32):

    tau_i  = theta_i[j] - theta_base[j]                         (float32)
    merged = ((tau_0 * w_0 + tau_1 * w_1) + ...) / Z            (Z = sum_i w_i if normalize, else 1)
    out[j] = round(theta_base[j] + lambda * merged)

which are the reference's float32 operations in its order (x / 1 and x * 1 are exact,
so the unnormalised, lambda-1 case needs no branch), rounded to the output dtype as
torch rounds. One read of every input, one write. Ilharco et al. 2023, arXiv:2212.04089.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels import one_thread
from mergelab.methods.kernels.io import as_array, load, store, store_dtype, usable

__all__ = ["supports", "run", "into", "task_arithmetic_into"]

_BLOCK = 1 << 16


@njit(parallel=True, nogil=True, cache=True)
def _pair(x0, x1, base, w0, w1, divisor, lam, out):
    """Two task vectors, a flat loop (the compiler vectorises it)."""
    for j in prange(base.shape[0]):
        b = load(base, j)
        merged = (load(x0, j) - b) * w0 + (load(x1, j) - b) * w1
        store(out, j, b + lam * (merged / divisor))


@njit(parallel=True, nogil=True, cache=True)
def _many(xs, base, weights, divisor, lam, out):
    """Any number of task vectors, block by block (numba's parfor pass rejects the flat form)."""
    n = base.shape[0]
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        for j in range(blk * _BLOCK, min(n, (blk + 1) * _BLOCK)):
            b = load(base, j)
            merged = (load(xs[0], j) - b) * weights[0]
            for i in range(1, len(xs)):
                merged += (load(xs[i], j) - b) * weights[i]
            store(out, j, b + lam * (merged / divisor))


def task_arithmetic_into(xs: Sequence[Tensor], base: Tensor, weights: Sequence[float], *, normalize: bool,
                         lam: float, out: Tensor) -> Tensor:
    """Write task arithmetic of `xs` on `base` into `out` (float32 or bfloat16, contiguous, base's shape).

    Raises MergeError (as the reference does) when `normalize` is set and the weights sum to zero.
    """
    from mergelab.methods.primitives import weight_divisor

    w = torch.tensor([float(v) for v in weights], dtype=torch.float32)
    divisor = np.float32(weight_divisor(w) if normalize else 1.0)
    if out.numel():
        rows, wn = tuple(as_array(t) for t in xs), w.numpy()  # float32 scalars: the pass stays in float32
        with one_thread():  # a streaming pass: one thread each, as the linear kernel (kernels/__init__.py)
            if len(rows) == 2:
                _pair(rows[0], rows[1], as_array(base), wn[0], wn[1], divisor, np.float32(lam), as_array(out))
            else:
                _many(rows, as_array(base), wn, divisor, np.float32(lam), as_array(out))
    return out


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """CPU inputs all bfloat16 or all float32, a base, one parameter set per model."""
    return base is not None and len(xs) > 0 and len(p) == len(xs) and usable([*xs, base])


def run(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """task_arithmetic (methods/task_arithmetic.py) on the inputs as stored, rounded to out_dtype in the pass."""
    written = store_dtype(out_dtype)
    out = torch.empty(base.shape, dtype=written)
    into(xs, base, p, s, out)
    return out if out_dtype == written else out.to(out_dtype)


def into(xs: Sequence[Tensor], base: Tensor, p, s, out: Tensor, state=None) -> None:
    """run()'s numbers written into `out` (base's shape, float32 or bfloat16, contiguous CPU); no state."""
    task_arithmetic_into(xs, base, [float(q.weight) for q in p], normalize=bool(s.normalize),
                         lam=float(s.lambda_), out=out)
