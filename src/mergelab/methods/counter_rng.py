"""A counter-based random number generator for the keep masks of DARE and DELLA.

Entry j of model i's mask is drawn from a hash of (key, i, j) alone:

    k0, k1 = stream_keys(key, i)                    two 32-bit words, once per model
    h      = mix(mix(lo32(j) ^ k0) ^ hi32(j) ^ k1)  per entry, j the flat index
    u      = (h >> 8) * 2**-24                      uniform on {0, 2**-24, ..., 1 - 2**-24}
    keep   = u < p

with mix a 32-bit integer finaliser (xorshift-multiply, the "lowbias32" family
of hashes by C. Wellons, 2018; both multipliers below 2**31, so every product
of a 32-bit value fits a signed 64-bit integer and torch computes it exactly).
`key` is the generator's seed, which the engine derives from (--seed, tensor
name). So a mask depends on the seed, the tensor's name, the model's position
and the entry's index only: not on the order in which tensors are processed,
not on how a kernel splits the tensor into blocks or threads, and a compiled
kernel (methods/kernels/rng.py) draws the very same bits as this torch code.

MergeKit draws its masks with torch.bernoulli from torch's global generator,
so its masks differ from ours entry by entry while following the same
distribution (each entry kept independently with probability p).
"""

from __future__ import annotations

import torch
from torch import Generator, Tensor

__all__ = ["MULT", "mix32", "stream_keys", "generator_key", "uniform", "keep_mask"]

M32 = 0xFFFFFFFF
MULT = (0x21F0AAAD, 0x735A2D97)  # lowbias32's improved multipliers; both < 2**31
_BLOCK = 1 << 20  # entries hashed at a time, to bound the int64 temporaries


def mix32(h: int) -> int:
    """The 32-bit finaliser on one Python int (a bijection of [0, 2**32))."""
    h ^= h >> 16
    h = (h * MULT[0]) & M32
    h ^= h >> 15
    h = (h * MULT[1]) & M32
    return h ^ (h >> 15)


def _mix32_(h: Tensor) -> Tensor:
    """mix32 on an int64 tensor of values in [0, 2**32), in place."""
    h.bitwise_xor_(h >> 16).mul_(MULT[0]).bitwise_and_(M32)
    h.bitwise_xor_(h >> 15).mul_(MULT[1]).bitwise_and_(M32)
    return h.bitwise_xor_(h >> 15)


def generator_key(gen: Generator) -> int:
    """The 64-bit key of a generator: its seed (the engine seeds it from --seed and the tensor name)."""
    return int(gen.initial_seed()) & ((1 << 64) - 1)


def stream_keys(key: int, stream: int) -> tuple[int, int]:
    """(k0, k1): the two 32-bit words that select model `stream`'s sequence under `key`."""
    k0 = mix32((key & M32) ^ mix32((0x9E3779B9 * (2 * stream + 1)) & M32))
    k1 = mix32(((key >> 32) & M32) ^ mix32(k0 ^ 0x85EBCA6B))
    return k0, k1


def uniform(key: int, stream: int, start: int, stop: int, device: torch.device | str = "cpu") -> Tensor:
    """(stop - start,) float32 uniforms in [0, 1) for entries start..stop-1 of model `stream`."""
    k0, k1 = stream_keys(key, stream)
    j = torch.arange(start, stop, dtype=torch.int64, device=device)
    h = _mix32_(j.bitwise_and(M32).bitwise_xor_(k0))
    h = _mix32_(h.bitwise_xor_(j >> 32).bitwise_xor_(k1))
    # h >> 8 has 24 bits, exact in float32; the scaling by a power of two is exact too
    return (h >> 8).to(torch.float32).mul_(2.0 ** -24)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float | Tensor, key: int, stream: int,
              device: torch.device | str = "cpu") -> Tensor:
    """Bool mask of `shape`: entry j kept when uniform(key, stream, j) < p (p a float or a float32 tensor)."""
    n = 1
    for d in shape:
        n *= int(d)
    out = torch.empty(n, dtype=torch.bool, device=device)
    probs = p.reshape(-1) if isinstance(p, Tensor) else None
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        u = uniform(key, stream, start, stop, device)
        threshold = probs[start:stop] if probs is not None else torch.tensor(p, dtype=torch.float32, device=device)
        torch.lt(u, threshold, out=out[start:stop])
    return out.reshape(shape)
