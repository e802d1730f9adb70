"""The counter-based generator of methods/counter_rng.py, compiled (numba): the same bits per entry.

uniform(k0, k1, j) is the torch reference's uniform for entry j of the stream
whose keys are (k0, k1) (counter_rng.stream_keys). Integer arithmetic is done
on uint64 and masked to 32 bits, exactly as the reference does on int64.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergelab.methods.counter_rng import MULT

__all__ = ["uniform"]

_M32 = np.uint64(0xFFFFFFFF)
_A = np.uint64(MULT[0])
_B = np.uint64(MULT[1])
_S8, _S15, _S16, _S32 = np.uint64(8), np.uint64(15), np.uint64(16), np.uint64(32)
_SCALE = np.float32(2.0 ** -24)


@njit(inline="always")
def _mix32(h):
    h ^= h >> _S16
    h = (h * _A) & _M32
    h ^= h >> _S15
    h = (h * _B) & _M32
    return h ^ (h >> _S15)


@njit(inline="always")
def uniform(k0, k1, j):
    """Uniform float32 in [0, 1) of entry j (int64) of the stream keyed (k0, k1) (uint64 holding 32 bits)."""
    c = np.uint64(j)
    h = _mix32((c & _M32) ^ k0)
    h = _mix32(h ^ (c >> _S32) ^ k1)
    return np.float32(h >> _S8) * _SCALE
