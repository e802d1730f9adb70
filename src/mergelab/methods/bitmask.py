"""Boolean masks packed 8 entries to a byte (numpy's packbits order: first entry in the high bit)."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["pack_masks", "unpack_mask"]


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, *shape) bool -> (N, ceil(numel / 8)) uint8: each row's entries, flattened, 8 to a byte."""
    flat = masks.detach().cpu().reshape(masks.shape[0], -1).numpy()
    return torch.from_numpy(np.packbits(flat, axis=1))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One packed row (ceil(numel / 8),) uint8 -> the bool mask of `shape`."""
    numel = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy(), count=numel)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)
