"""Torch files that hold state rather than a model: optimizer and averager state, data files.

They are read with ``weights_only=True`` only: torch's restricted unpickler,
which rebuilds tensors, numbers, strings and containers and refuses anything
else, so reading a file can never run code from it. Errors are torch's own;
callers name the file (and what it should hold) in theirs.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.tensor_file import load_tensors

__all__ = ["load_state", "read_data_file", "save_state", "state_bytes"]


def load_state(path: str | os.PathLike, *, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` onto `map_location` (None: where the tensors were saved);
    other keyword arguments (``mmap``) go to torch.load."""
    return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


def save_state(state: Any, path: str | os.PathLike) -> None:
    """``torch.save(state, path)``: a file `load_state` reads back."""
    torch.save(state, path)


def state_bytes(state: Any) -> bytes:
    """The bytes ``torch.save`` writes for `state`, for a writer that puts them into a folder itself."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def read_data_file(path: str | os.PathLike) -> Any:
    """The contents of a data file: name -> tensor for a .safetensors file, else a weights_only torch file."""
    if Path(path).suffix == ".safetensors":
        return load_tensors(path)
    return load_state(path)
