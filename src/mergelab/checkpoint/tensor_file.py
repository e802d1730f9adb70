"""Whole safetensors files of tensors, read into or written from memory with the safetensors library.

For files small enough to hold at once: statistics, adapter weights, a demo's
fine-tuned model, an averaged model saved during training. Models to merge are
read lazily through `Checkpoint` and written through `CheckpointWriter` instead.
Errors are the safetensors library's own; callers name the file in theirs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergelab.checkpoint.output import atomic_file

__all__ = ["load_tensors", "save_tensors", "save_tensors_atomic"]


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at `path`, on the CPU: name -> tensor."""
    from safetensors.torch import load_file

    return load_file(str(path))


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (contiguous) as the safetensors file `path`, with `metadata` in its header."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=None if metadata is None else dict(metadata))


def save_tensors_atomic(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None = None, *, inputs: Sequence[str | Path] = (),
                        overwrite: bool = False, what: str = "output") -> None:
    """`save_tensors` through `output.atomic_file`: checked against `inputs`, written under a temporary
    name and renamed onto `path` only when complete (see atomic_file for `overwrite` and `what`)."""
    with atomic_file(path, inputs=inputs, overwrite=overwrite, what=what) as tmp:
        save_tensors(tmp, tensors, metadata)
