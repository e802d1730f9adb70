"""DeviationGram's sampled Gram in one compiled pass (numba), read from the checkpoints as stored.

For every sampled position j (first, first + stride, ...) the K checkpoints'
values v_i = x_i[j] (bfloat16 bits or float32, no copies) are centred on their
mean and the products (v_i - m)(v_l - m) added, in float64, to a per-block
K x K Gram; blocks run in parallel and are summed at the end. The inputs go
in as a tuple of a fixed length (_ARITY, padded with the first input, which
is never read twice), so numba compiles the kernel once per storage dtype
whatever K is. The numbers are average.DeviationGram's torch path's up to
float64 rounding (the summation order differs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange

from mergelab.methods.kernels.io import as_array, load, usable

_ARITY = 16  # most checkpoints one call takes; more go to the torch path
_COLUMNS = 1 << 14  # samples per parallel block


@njit(parallel=True, cache=True)
def _block_grams(x, k, first, stride, count, out):
    for b in prange(out.shape[0]):
        g = np.zeros((k, k))
        v = np.empty(k)
        for s in range(b * _COLUMNS, min(count, (b + 1) * _COLUMNS)):
            j = first + s * stride
            m = 0.0
            for i in range(k):
                v[i] = np.float64(load(x[i], j))
                m += v[i]
            m /= k
            for i in range(k):
                v[i] -= m
            for i in range(k):
                for l in range(i, k):
                    g[i, l] += v[i] * v[l]
        out[b] = g


def supports(flat: Sequence[torch.Tensor]) -> bool:
    """2 to _ARITY contiguous CPU tensors, all bfloat16 or all float32."""
    return 1 < len(flat) <= _ARITY and usable(list(flat))


def gram(flat: Sequence[torch.Tensor], first: int, stride: int) -> torch.Tensor:
    """(K, K) float64: sum over j = first, first + stride, ... of the centred products."""
    k, n = len(flat), flat[0].numel()
    count = max(0, (n - first + stride - 1) // stride)
    out = np.zeros(((count + _COLUMNS - 1) // _COLUMNS, k, k))
    if count:
        arrays = [as_array(t) for t in flat]
        _block_grams(tuple(arrays + [arrays[0]] * (_ARITY - k)), k, first, stride, count, out)
    upper = out.sum(0)  # (K, K), upper triangle filled
    return torch.from_numpy(upper + np.triu(upper, 1).T)
