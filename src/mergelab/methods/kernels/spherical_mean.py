"""multislerp and karcher on the CPU in two compiled passes (numba), one thread, outside the GIL.

    gram:    G_ik = <v_i, v_k> of the vectors v_i = x_i - base (or x_i), read as stored
             (bfloat16 bits or float32), v_i formed in float32 as the reference forms it,
             products and sums in float64 (kernels/gram.py, shared with nuslerp and model_stock);
    combine: theta_j = sum_i k_i v_i[j] (+ base[j]) in float32, in model order, rounded
             to the output dtype in the same pass (the linear kernel's weighted sum, or with a
             base task arithmetic's pass),

with the coefficients k from the same float64 code as the reference
(spherical.multislerp_weights, spherical.karcher_coefficients), run on G in between.
No float32 copies of the inputs and no (n, numel) temporaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mergelab.methods.kernels.gram import gram
from mergelab.methods.kernels.io import store_dtype, usable
from mergelab.methods.kernels.linear import weighted_sum
from mergelab.methods.kernels.task_arithmetic import task_arithmetic_into

__all__ = ["supports", "run"]


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s, *, method: str) -> bool:
    """Two or more models on the CPU (and a base for multislerp, if any), all bfloat16 or all float32."""
    used = [*xs, base] if method == "multislerp" and base is not None else list(xs)
    return len(xs) >= 2 and xs[0].numel() > 0 and usable(used)


def run(xs: Sequence[Tensor], base: Tensor | None, p, s, gen, out_dtype: torch.dtype, *, method: str) -> Tensor:
    """multislerp or karcher (methods/spherical.py) of the tensors as stored, rounded to out_dtype."""
    from mergelab.methods.primitives import karcher_coefficients, multislerp_weights

    if method == "karcher":
        base = None  # karcher takes no base
        coef = karcher_coefficients(gram(xs), s.max_iter, s.tol, torch.float32)
    else:
        coef = multislerp_weights(gram(xs, base), p.tensor("weight", torch.empty(0)), s)
    k = coef.numpy().astype(np.float32)
    if base is None:
        return weighted_sum(list(xs), k, out_dtype).reshape(xs[0].shape)
    # sum_i k_i (x_i - base) + base: task arithmetic's pass with weights k, no normalisation, lambda 1
    # (b + 1 * (m / 1) is b + m exactly), in model order, rounded to the output dtype.
    out = torch.empty(base.shape, dtype=store_dtype(out_dtype))
    task_arithmetic_into(xs, base, k.tolist(), normalize=False, lam=1.0, out=out)
    return out.to(out_dtype)
