"""Flat buckets of parameters, and the quantizers pseudo-gradients travel in.

A bucket is a list of same-dtype tensors sent as one flat buffer, so a sync is
a handful of collectives whatever the number of tensors (never one call per
tensor). Quantized pseudo-gradients are packed into one uint8 buffer per
bucket (codes, then per-block float32 scales) and all-gathered; each worker
dequantizes everyone's and averages in float32, since quantized codes cannot be
summed on the wire.

    bf16: round to bfloat16 (2 bytes/value)
    fp8:  per block of 128 values s = absmax / 448, code = float8_e4m3fn(x / s)
          (1 byte/value + 4 bytes/block)
    int4: per block of 64 values s = absmax, code = round(7 x / s) + 8 in 0..15,
          two codes per byte (0.5 byte/value + 4 bytes/block); symmetric
          absmax quantization as in Streaming DiLoCo (Douillard et al., 2025,
          arXiv:2501.18512), which reports 4-bit pseudo-gradients losing nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

QUANTIZERS = ("none", "bf16", "fp8", "int4")
_BLOCK = {"fp8": 128, "int4": 64}
_FP8_MAX = 448.0


def make_buckets(tensors: Sequence[Tensor], cap_bytes: int) -> list[list[int]]:
    """Indices of `tensors` grouped into buckets of one dtype and at most cap_bytes (a bigger
    tensor gets a bucket of its own); order is kept."""
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if not buckets or t.dtype != dtype or size + nbytes > cap_bytes:
            buckets.append([])
            size, dtype = 0, t.dtype
        buckets[-1].append(i)
        size += nbytes
    return buckets


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """One contiguous 1-D copy of the tensors, in order."""
    return torch.cat([t.detach().reshape(-1).to(dtype or t.dtype) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of `flat` (1-D, or (W, total) with a leading worker axis) shaped like `like`."""
    out, offset = [], 0
    lead = tuple(flat.shape[:-1])
    for t in like:
        n = t.numel()
        out.append(flat[..., offset:offset + n].reshape(*lead, *t.shape))
        offset += n
    return out


def _blocks(x: Tensor, block: int) -> Tensor:
    pad = (-x.numel()) % block
    return torch.nn.functional.pad(x.float(), (0, pad)).view(-1, block)  # (blocks, block)


def quantize(x: Tensor, kind: str) -> Tensor:
    """1-D float tensor -> one uint8 buffer holding its codes and scales."""
    if kind == "bf16":
        return x.to(torch.bfloat16).view(torch.uint8)
    block = _BLOCK[kind]
    xb = _blocks(x, block)
    amax = xb.abs().amax(dim=1, keepdim=True)  # (blocks, 1)
    if kind == "fp8":
        scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
        codes = (xb / scale).to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1)
    elif kind == "int4":
        scale = torch.where(amax > 0, amax, torch.ones_like(amax))
        q = (torch.round(xb / scale * 7).clamp(-7, 7) + 8).to(torch.uint8).reshape(-1)  # 1..15
        codes = q[0::2] | (q[1::2] << 4)
    else:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANTIZERS)}")
    return torch.cat([codes, scale.reshape(-1).contiguous().view(torch.uint8)])


def dequantize(buf: Tensor, kind: str, numel: int) -> Tensor:
    """Inverse of `quantize`: uint8 buffer -> float32 (numel,)."""
    if kind == "bf16":
        return buf.view(torch.bfloat16).float()
    block = _BLOCK[kind]
    nblocks = math.ceil(numel / block)
    ncodes = nblocks * block if kind == "fp8" else nblocks * block // 2
    codes, scale = buf[:ncodes], buf[ncodes:].view(torch.float32).view(-1, 1)
    if kind == "fp8":
        xb = codes.view(torch.float8_e4m3fn).float().view(nblocks, block) * scale
    else:
        q = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1).float() - 8  # -7..7
        xb = q.view(nblocks, block) / 7 * scale
    return xb.reshape(-1)[:numel]


def quantized_nbytes(numel: int, kind: str) -> int:
    """Bytes of `quantize`'s buffer for numel values."""
    if kind == "bf16":
        return 2 * numel
    nblocks = math.ceil(numel / _BLOCK[kind])
    codes = nblocks * _BLOCK[kind] if kind == "fp8" else nblocks * _BLOCK[kind] // 2
    return codes + 4 * nblocks
