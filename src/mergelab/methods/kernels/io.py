"""What the compiled (numba) CPU kernels share: element access in the storage dtype.

Kernels read bfloat16 tensors as their uint16 bit patterns and float32 tensors
as they are; `load` and `store` compile to the right conversion for each, so
one kernel source serves both and does its arithmetic in float32 registers.
Note for developers: numba's on-disk cache tracks the kernel's own file only;
after changing this file, delete the __pycache__ folder next to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import types
from numba.extending import overload
from torch import Tensor

__all__ = ["as_array", "load", "store", "usable"]

KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def load(a, j):
    """a[j] as float32; a holds bfloat16 bits (uint16) or float32 values (compiled by the overload below)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(load, inline="always")
def _load(a, j):
    if a.dtype == types.uint16:
        return lambda a, j: np.uint32(np.uint32(a[j]) << 16).view(np.float32)
    return lambda a, j: a[j]


def store(a, j, value):
    """a[j] = value (float32), rounded to bfloat16 when a holds bfloat16 bits (compiled by the overload)."""
    raise NotImplementedError("only callable from numba-compiled code")


# No inline="always" here (unlike load): numba's IR-level inlining of this body left the callers'
# loops scalar and branchy (a TIES combine of 11.5M bfloat16 entries took 164 ms of CPU instead of
# 8 ms on one thread); as an ordinary overload LLVM inlines it and vectorises the loop.
@overload(store)
def _store(a, j, value):
    if a.dtype == types.uint16:
        def to_bfloat16(a, j, value):
            # Round to nearest even, as torch converts float32 to bfloat16; NaN stays NaN.
            bits = np.uint32(np.float32(value).view(np.uint32))
            rounded = np.uint32(bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
            a[j] = np.uint16(0x7FC0) if value != value else np.uint16(rounded >> np.uint32(16))
        return to_bfloat16

    def as_float(a, j, value):
        a[j] = value
    return as_float


def as_array(t: Tensor) -> np.ndarray:
    """A flat numpy view of t's memory: bfloat16 as its uint16 bits, float32 as is."""
    flat = t.reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else flat.numpy()


def store_dtype(out_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a kernel's pass writes for output dtype `out_dtype`: bfloat16 for bfloat16 (rounded
    in the pass), float32 for anything else (converted afterwards, as the reference's result is)."""
    return torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32


def usable(tensors: Sequence[Tensor]) -> bool:
    """Whether kernels can take these tensors: on the CPU, contiguous, all bfloat16 or all float32."""
    dtype = tensors[0].dtype
    return dtype in KERNEL_DTYPES and all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
                                          for t in tensors)
