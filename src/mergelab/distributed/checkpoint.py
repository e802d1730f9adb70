"""Crash recovery of a DiLoCo run: the global model and the outer optimizer, saved atomically.

Each save is a folder `checkpoint-<sync>/` in the run folder, the layout
`mergelab average` and `mergelab recover` read: `model.safetensors` (the
global parameters, and the worker's buffers), `optimizer.pt` (the outer
optimizer's state_dict, which `recover` copies beside its average) and
`mergelab_diloco.json` (sync count). The folder is written under a temporary
name and renamed into place by mergelab.checkpoint.writer.CheckpointWriter, so
a crash mid-save leaves no half checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mergelab.checkpoint.state_file import load_state, state_bytes
from mergelab.checkpoint.tensor_file import load_tensors
from mergelab.errors import CheckpointError

STATE_FILE = "mergelab_diloco.json"


def save_global(run_dir: str | Path, step: int, state_dict: dict[str, Tensor], outer_state: dict,
                meta: dict[str, Any]) -> Path:
    """Write run_dir/checkpoint-<step>/ atomically; returns its path."""
    from mergelab.checkpoint.writer import CheckpointWriter, TensorInfo

    sd = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    layout = [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    optimizer_bytes = state_bytes(outer_state)
    out = Path(run_dir) / f"checkpoint-{step}"
    writer = CheckpointWriter(out, layout, shard_size=2**62, overwrite=True)
    try:
        for k, v in sd.items():
            writer.write(k, v)
        return writer.finish(extra_files={"optimizer.pt": optimizer_bytes,
                                          STATE_FILE: json.dumps({"step": step, **meta}, indent=2)})
    except BaseException:
        writer.abort()
        raise


def load_global(path: str | Path, model: nn.Module) -> tuple[dict[str, Tensor], dict, dict[str, Any]]:
    """(state dict, outer optimizer state, meta) of a checkpoint-<step>/ folder, checked against `model`."""
    folder = Path(path)
    files = [folder / "model.safetensors", folder / "optimizer.pt", folder / STATE_FILE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a DiLoCo checkpoint: it lacks {', '.join(missing)}")
    sd = load_tensors(files[0])
    for name, p in model.named_parameters():
        if name not in sd:
            raise CheckpointError(f"{files[0]} has no tensor {name}; it was saved from another model")
        if tuple(sd[name].shape) != tuple(p.shape):
            raise CheckpointError(f"{files[0]} tensor {name} has shape {tuple(sd[name].shape)}, "
                                  f"the model's is {tuple(p.shape)}")
    outer_state = load_state(files[1])
    return sd, outer_state, json.loads(files[2].read_text())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint-<step>/ DiLoCo folder of run_dir, or None."""
    run = Path(run_dir)
    if not run.is_dir():
        return None
    found = []
    for child in run.iterdir():
        if child.name.startswith("checkpoint-") and (child / STATE_FILE).is_file():
            try:
                found.append((int(child.name.split("-", 1)[1]), child))
            except ValueError:
                continue
    return max(found)[1] if found else None
