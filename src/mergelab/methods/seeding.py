"""Seeds of randomised methods: one generator per (seed, tensor name), whatever the processing order."""

from __future__ import annotations

import hashlib

import torch


def tensor_seed(seed: int | None, name: str) -> int:
    """A 63-bit seed from (seed, tensor name): results do not depend on processing order."""
    digest = hashlib.sha256(f"{seed if seed is not None else 0}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int | None, name: str, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(tensor_seed(seed, name))
    return gen
