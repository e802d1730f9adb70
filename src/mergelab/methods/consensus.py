"""Consensus primitives of TIES: elect a sign per entry, then average the entries that agree.

    elect_sign        sign of the summed task vectors            (TIES elect)
    disjoint_mean     mean of the entries that agree with it     (TIES merge)
    elect_and_combine both, block by block over a flattened tensor
"""

from __future__ import annotations

import torch
from torch import Tensor


def elect_sign(deltas: Tensor) -> Tensor:
    """(*shape) +1/-1: sign of sum_i deltas_i, with +1 where the sum is zero (TIES, MergeKit 'sum')."""
    total = deltas.sum(dim=0)  # (*shape)
    return total.ge_(0).mul_(2).sub_(1)  # ge_ on a float tensor writes 1.0 / 0.0


def disjoint_mean(weighted: Tensor, sign: Tensor, weights: Tensor, *, normalize: bool = True) -> Tensor:
    """Sum of the entries whose sign agrees with ``sign``, over the weights of those entries.

    out = sum_i d_i [sign(d_i) = s] / sum_i w_i [sign(d_i) = s]; zero entries never agree.
    Where nothing agrees the sum is left undivided (it is 0 unless weights are negative).

    Args:
        weighted: (N, *shape) task vectors already multiplied by their weights.
        sign: (*shape) the elected sign, +1 or -1.
        weights: (N,) the weights (the divisor's terms).
        normalize: divide by the agreeing weights; otherwise return the plain sum.
    """
    total = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign) if normalize else None
    for w, row in zip(weights.tolist(), weighted):
        agree = row * sign > 0  # (*shape) bool, one row at a time to bound memory
        total.add_(torch.where(agree, row, 0.0))
        if normalize:
            divisor.add_(agree, alpha=w)
    if normalize:
        total.div_(divisor.masked_fill_(divisor == 0, 1))
    return total


_CHUNK = 1 << 18  # elements per block: the N rows of a block stay in cache through every step


def elect_and_combine(weighted: Tensor, weights: Tensor, *, normalize: bool = True) -> Tensor:
    """disjoint_mean(weighted, elect_sign(weighted), weights) computed block by block.

    Every step after trimming is elementwise, so working on cache-sized blocks
    of the flattened tensor gives the same numbers with a fraction of the
    memory traffic and of the scratch memory of whole-tensor passes.
    """
    n = weighted.shape[0]
    flat = weighted.reshape(n, -1)
    out = torch.empty(flat.shape[1], dtype=weighted.dtype, device=weighted.device)
    for start in range(0, flat.shape[1], _CHUNK):
        block = flat[:, start:start + _CHUNK]
        out[start:start + _CHUNK] = disjoint_mean(block, elect_sign(block), weights, normalize=normalize)
    return out.reshape(weighted.shape[1:])


