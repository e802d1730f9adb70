"""The side files of a merge whose tasks can be rebuilt (tall_masks, emr): tensors and their description.

Beside the merged weights, in the same output folder (written into its temporary folder, so they
appear with the model or not at all):

    task_models.safetensors   per merged tensor NAME, its side tensors as "NAME::KEY" (e.g. NAME::masks,
                              uint8 bit-packed per-task masks; NAME::base_sha1, the base tensor's digest)
    task_models.json          the method, its parameters, the tasks, the base and run-level numbers
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import CheckpointError

__all__ = ["SIDE_TENSORS", "SIDE_META", "side_files", "read_side", "tensor_digest"]

SIDE_TENSORS = "task_models.safetensors"
SIDE_META = "task_models.json"
_SEP = "::"


def tensor_digest(t: torch.Tensor) -> torch.Tensor:
    """SHA-1 of a tensor's bytes as stored (dtype, values; not the shape) as 20 uint8."""
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return torch.frombuffer(bytearray(hashlib.sha1(raw).digest()), dtype=torch.uint8)


def side_files(side: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping[str, Any]) -> dict[str, bytes]:
    """{file name: content} of the side files: `side` (tensor name -> {key: tensor}) and `meta`."""
    from safetensors.torch import save

    flat = {f"{name}{_SEP}{key}": t.contiguous() for name, keys in side.items() for key, t in keys.items()}
    return {SIDE_TENSORS: save(flat), SIDE_META: (json.dumps(dict(meta), indent=1) + "\n").encode("utf-8")}


def read_side(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(tensor name -> {key: tensor}, meta) from a merged folder; CheckpointError naming a missing or bad file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, tensors_path = folder / SIDE_META, folder / SIDE_TENSORS
    for path in (meta_path, tensors_path):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {folder} was not written by a merge whose tasks can be "
                                  "rebuilt (tall_masks, emr)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        flat = load_file(str(tensors_path))
    except Exception as exc:  # OSError, JSON errors, the safetensors library's own
        raise CheckpointError(f"{meta_path if isinstance(exc, json.JSONDecodeError) else tensors_path} "
                              f"cannot be read ({exc})") from None
    side: dict[str, dict[str, torch.Tensor]] = {}
    for full, t in flat.items():
        name, _, key = full.rpartition(_SEP)
        side.setdefault(name, {})[key] = t
    return side, meta
