"""multislerp and karcher on the CPU in two compiled passes (numba), one thread, outside the GIL.

    gram:    G_ik = <v_i, v_k> of the vectors v_i = x_i - base (or x_i), read as stored
             (bfloat16 bits or float32), v_i formed in float32 as the reference forms it,
             products and sums in float64 (kernels/gram.py, shared with nuslerp and model_stock);
    combine: theta_j = sum_i k_i v_i[j] (+ base[j]) in float32, in model order, rounded
             to the output dtype in the same pass,

with the coefficients k from the same float64 code as the reference
(spherical.multislerp_weights, spherical.karcher_coefficients), run on G in between.
No float32 copies of the inputs and no (n, numel) temporaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels import one_thread
from mergelab.methods.kernels.gram import gram
from mergelab.methods.kernels.io import as_array, load, store, usable
from mergelab.methods.kernels.linear import weighted_sum

__all__ = ["supports", "run"]

_BLOCK = 1 << 16  # entries per parallel block of the combining pass


@njit(parallel=True, nogil=True, cache=True)
def _combine_base(rows, coef, base, out):
    """out[j] = sum_i coef[i] (rows[i][j] - base[j]) + base[j] in float32, model order."""
    size = out.shape[0]
    for blk in prange((size + _BLOCK - 1) // _BLOCK):  # blocks: numba's parfor pass rejects the flat form
        for j in range(blk * _BLOCK, min(size, (blk + 1) * _BLOCK)):
            c = load(base, j)
            acc = (load(rows[0], j) - c) * coef[0]
            for i in range(1, len(rows)):
                acc += (load(rows[i], j) - c) * coef[i]
            store(out, j, acc + c)


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s, *, method: str) -> bool:
    """Two or more models on the CPU (and a base for multislerp, if any), all bfloat16 or all float32."""
    used = [*xs, base] if method == "multislerp" and base is not None else list(xs)
    return len(xs) >= 2 and xs[0].numel() > 0 and usable(used)


def run(xs: Sequence[Tensor], base: Tensor | None, p, s, gen, out_dtype: torch.dtype, *, method: str) -> Tensor:
    """multislerp or karcher (methods/spherical.py) of the tensors as stored, rounded to out_dtype."""
    from mergelab.methods.spherical import karcher_coefficients, multislerp_weights

    if method == "karcher":
        base = None  # karcher takes no base
        coef = karcher_coefficients(gram(xs), s.max_iter, s.tol, torch.float32)
    else:
        coef = multislerp_weights(gram(xs, base), p.tensor("weight", torch.empty(0)), s)
    k = coef.numpy().astype(np.float32)
    if base is None:
        return weighted_sum(list(xs), k, out_dtype).reshape(xs[0].shape)
    out = torch.empty(base.numel(), dtype=torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
    with one_thread():
        _combine_base(tuple(as_array(t) for t in xs), k, as_array(base), as_array(out))
    return out.reshape(base.shape).to(out_dtype)
