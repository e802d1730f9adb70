"""How users spell dtypes and shard sizes: "bf16", "float32", "5GB", MergeKit's "5B".

Both parsers raise ValueError subclasses (InvalidInput is one), so pydantic
validators report a bad value as a field error of the recipe.
"""

from __future__ import annotations

import math
import re

import torch

from mergelab.errors import InvalidInput

__all__ = ["parse_dtype", "parse_size"]

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(text: str | torch.dtype) -> torch.dtype:
    """The torch dtype named by `text` ("bfloat16", "bf16", "float16", "fp16", "half", "float32", ...).

    Raises ValueError (so pydantic validators report it as a field error).
    """
    if isinstance(text, torch.dtype):
        return text
    key = str(text).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {text!r}; use one of bfloat16 (bf16), float16 (fp16, half), "
                         "float32 (fp32, float), float64")
    return _DTYPE_NAMES[key]


# Byte units, unambiguous: decimal (KB, MB, GB, TB, as transformers counts) and binary (KiB ...).
_BYTE_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# MergeKit's spelling (its parse_kmb): K, M, B = thousand, million, billion, case-insensitive.
# MergeKit documents the number as "parameters per shard" but its writer compares it with
# each tensor's numel x element_size, i.e. bytes; we do the same so shards match MergeKit's.
_KMB = {"k": 10**3, "m": 10**6, "b": 10**9}
_MAX_SIZE = 2**62


def parse_size(value: str | int) -> int:
    """Bytes per output shard from "5GB", "500MB", "2GiB", MergeKit's "5B"/"500M"/"100K", or a plain integer.

    "5B" is MergeKit's spelling of 5 billion (not 5 bytes) and means what it
    means to MergeKit (5e9, compared with tensor bytes). Anything else (a bare
    "G", a fraction of a byte, a non-finite number) is refused.
    """
    hint = ("write a shard size like 5GB, 500MB or 2GiB (bytes), MergeKit's 5B / 500M "
            "(billions / millions, as mergekit-yaml reads them), or a whole number of bytes")
    if isinstance(value, bool):
        raise InvalidInput(f"cannot read shard size {value!r}; {hint}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if unit is None or (unit and unit not in _BYTE_UNITS and unit not in _KMB):
            raise InvalidInput(f"cannot read shard size {value!r}; {hint}")
        number = float(match.group(1))
        scaled = number * (_BYTE_UNITS.get(unit) or _KMB.get(unit) or 1)
        if not math.isfinite(scaled) or scaled >= _MAX_SIZE:
            raise InvalidInput(f"shard size {value!r} is too large; {hint}")
        if not unit and not number.is_integer():
            raise InvalidInput(f"shard size {value!r} is not a whole number of bytes; {hint}")
        size = int(scaled)
    if size <= 0 or size >= _MAX_SIZE:
        raise InvalidInput(f"shard size {value!r} must be a positive size below 4 EB; {hint}")
    return size
