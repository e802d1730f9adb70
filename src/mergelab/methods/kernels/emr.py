"""EMR-Merging on the CPU in one compiled pass (numba): the unified model and its side tensors together.

Per entry j, in the reference's float32 operations (methods/emr.py `elect`, `_emr_side`):

    tau_i = theta_i[j] - theta_base[j];   gamma = +1 if sum_i tau_i > 0 else -1 (summed in model order)
    mask_i = tau_i * gamma > 0;           tau_uni = gamma * max_i (mask_i ? |tau_i| : 0)
    out[j] = round(theta_base[j] + tau_uni),  mask bits packed 8 to a byte (bitmask.pack_masks' order)

and per task the sums of |tau_i| and of |tau_uni * mask_i| over the tensor, in float64, divided by
the tensor's size: the means the rescalers are made of. One read of every input, where the torch
reference makes the task vectors, a sign, the masks, two absolute values and two reductions, and
then elects again for the side tensors. Huang et al., NeurIPS 2024, arXiv:2405.17461.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels import one_thread
from mergelab.methods.kernels.io import as_array, load, store, store_dtype, usable

__all__ = ["supports", "run", "run_side"]

_BLOCK = 1 << 16  # a multiple of 8: no mask byte is shared by two blocks
_MAX_MODELS = 64


@njit(parallel=True, nogil=True, cache=True)
def _emr(xs, base, out, packed, sums):
    n, k = base.shape[0], len(xs)
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        tau = np.empty(k, dtype=np.float32)
        acc = np.zeros((k, 2), dtype=np.float64)  # this block's sums of |tau_i| and |tau_uni * mask_i|
        for j in range(blk * _BLOCK, min(n, (blk + 1) * _BLOCK)):
            b = load(base, j)
            total = np.float32(0.0)
            for i in range(k):
                tau[i] = load(xs[i], j) - b
                total += tau[i]
            gamma = np.float32(1.0) if total > 0 else np.float32(-1.0)
            best = np.float32(0.0)
            for i in range(k):
                t = tau[i] * gamma
                if t > best:  # t > 0 exactly where mask_i; then |tau_i| = t
                    best = t
            store(out, j, b + gamma * best)
            bit = np.uint8(1 << (7 - (j & 7)))
            for i in range(k):
                acc[i, 0] += abs(tau[i])
                if tau[i] * gamma > 0:
                    packed[i, j >> 3] |= bit
                    acc[i, 1] += best
        sums[blk] = acc


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """CPU inputs all bfloat16 or all float32, and a base."""
    return base is not None and 0 < len(xs) <= _MAX_MODELS and usable([*xs, base])


def run_side(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """(unified model in out_dtype, the side tensors of methods/emr.py `_emr_side`) in one pass.

    The masks are the reference's bits; the means are float64 sums over the tensor divided by its
    size, within float32 rounding of the reference's float32 means.
    """
    written = store_dtype(out_dtype)
    out = torch.empty(base.shape, dtype=written)
    numel, k = base.numel(), len(xs)
    packed = np.zeros((k, (numel + 7) // 8), dtype=np.uint8)
    sums = np.zeros(((numel + _BLOCK - 1) // _BLOCK, k, 2), dtype=np.float64)
    if numel:
        with one_thread():  # a streaming pass: one thread each, as the other elementwise kernels
            _emr(tuple(as_array(t) for t in xs), as_array(base), as_array(out), packed, sums)
    means = torch.from_numpy(sums.sum(0) / max(numel, 1)).to(torch.float32)  # (k, 2)
    side = {"masks": torch.from_numpy(packed), "abs_task": means[:, 0].contiguous(),
            "abs_uni": means[:, 1].contiguous()}
    return (out if out_dtype == written else out.to(out_dtype)), side


def run(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """emr's unified model (methods/emr.py) on the inputs as stored, rounded to out_dtype in the pass."""
    return run_side(xs, base, p, s, gen, out_dtype)[0]
