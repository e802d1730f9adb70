"""Pickled torch state dicts (.bin, .pt, .pth), loaded with weights_only=True and memory-mapped where they can be."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.file_state import check_path_unchanged, regular_file_state
from mergelab.checkpoint.state_file import load_state
from mergelab.errors import CheckpointError
from mergelab.jsonfile import has_control_characters, shown

__all__ = ["TorchFile", "fresh_copy"]


def fresh_copy(t: torch.Tensor) -> torch.Tensor:
    # A new contiguous tensor: callers may modify it, and it must not keep a
    # view of the loaded (possibly memory-mapped, possibly shared) storage.
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def _torch_load(path: Path, mmap: bool) -> Any:
    """torch.load with weights_only=True; None when this old-format file cannot be memory-mapped."""
    try:
        return load_state(path, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise CheckpointError(
                f"{path}: loading it needs unsafe unpickling (it stores Python objects other than "
                "tensors), which mergelab refuses; convert it to safetensors with a script you trust") from None
        raise CheckpointError(f"{path}: not a readable torch file ({shown(exc)}); it looks truncated or corrupt") from exc
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):
            return None
        raise CheckpointError(f"{path}: not a readable torch file ({shown(exc)}); "
                              "it looks truncated or corrupt") from exc
    except Exception as exc:  # EOFError, zipfile and struct errors: all mean a damaged file
        raise CheckpointError(f"{path}: not a readable torch file ({type(exc).__name__}: {shown(exc)}); "
                              "it looks truncated or corrupt") from exc


class TorchFile:
    """A pickled state dict, memory-mapped where the file format allows it."""

    def __init__(self, path: Path):
        self.path = path
        self.state = regular_file_state(path)
        obj = _torch_load(path, mmap=True)
        if obj is None:  # pre-1.6 torch.save format: no zip container to map
            obj = _torch_load(path, mmap=False)
        self.check_unchanged()  # changed while torch read it
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
        self.skipped: list[str] = []
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                self.skipped += [str(k) for k in obj if k != wrapper]
                obj = obj[wrapper]
                break
        self.tensors: dict[str, torch.Tensor] = {}
        for key, value in obj.items():
            if has_control_characters(str(key)):
                raise CheckpointError(f"{path}: key '{shown(key)}' holds control characters (a newline, NUL, ...); "
                                      "the file is corrupt or crafted, re-save it")
            if isinstance(value, torch.Tensor):
                self.tensors[str(key)] = value
            else:
                self.skipped.append(str(key))

    def check_unchanged(self) -> None:
        """Raise CheckpointError if the file at `path` is not the one loaded (tensors may be mapped from it)."""
        check_path_unchanged(self.path, self.state)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        self.check_unchanged()
        return fresh_copy(self.tensors[name]) if out is None else out.copy_(self.tensors[name])

    def view(self, name: str) -> torch.Tensor:
        self.check_unchanged()
        return self.tensors[name]  # memory-mapped (privately) where the file format allows it

    def advise(self, name: str, advice: int, rows: tuple[int, int] | None = None) -> bool:
        return True  # loaded by torch: nothing to advise

    def close(self) -> None:
        self.tensors = {}
