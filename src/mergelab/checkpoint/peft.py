"""PEFT adapter folders on disk: recognising them, reading their files and writing new ones.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``), whose tensors `Checkpoint(folder, adapter=True)` maps (the adapter
merge's opt-in; every other Checkpoint refuses adapters, adapter_error). What the factors inside
mean (scales, layouts, ranks) is mergelab.lora.peft_format's business; this module only finds,
reads and writes the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.output import MARKER, check_output, partial_path, replace_folder
from mergelab.checkpoint.tensor_file import save_tensors
from mergelab.errors import CheckpointError, MergeError
from mergelab.jsonfile import read_json_file, shown

__all__ = ["CONFIG_NAME", "WEIGHT_NAMES", "adapter_error", "adapter_weight_file", "is_adapter_folder",
           "is_peft_adapter", "read_adapter_config", "write_adapter_folder"]

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# Tensor names of LoRA factors as PEFT saves them (also DoRA magnitudes).
LORA_TENSOR = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")


def is_peft_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is a LoRA/PEFT adapter rather than a model: a folder holding adapter_config.json
    (transformers loads such a folder as an adapter too), or an adapter_model.safetensors/.bin file.

    Looks at file names only; Checkpoint also refuses files whose tensors are
    LoRA factors (names with lora_A / lora_B).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return (path / CONFIG_NAME).is_file()
    return path.name in WEIGHT_NAMES


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding adapter_config.json (a PEFT adapter), whatever else is in it.

    The rule of is_peft_adapter, for folders only: an adapter file given alone
    is not something the adapter merge reads.
    """
    return Path(path).expanduser().is_dir() and is_peft_adapter(path)


def adapter_error(path: Path, evidence: str) -> CheckpointError:
    """The refusal of an adapter given where a full model is expected; `evidence` says how it was recognised."""
    base = None
    config = path / CONFIG_NAME if path.is_dir() else path.parent / CONFIG_NAME
    if config.is_file():
        try:
            data = read_json_file(config, "adapter config", max_bytes=10**6)
            base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
        except MergeError:
            pass
    base_text = f" (its base model: {shown(base)})" if isinstance(base, str) and base else ""
    return CheckpointError(
        f"{path}: is a LoRA/PEFT adapter ({evidence}), not a full model{base_text}; merging adapters as if "
        "they were models would average their A and B factors separately, which is not the average of "
        "their updates B@A (a wrong model). Apply it to its base model first (PEFT: "
        "PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(DIR)) and merge DIR, "
        "or use a model+lora / adapter merge where mergelab supports one")


def read_adapter_config(path: Path) -> dict[str, Any]:
    """The parsed adapter_config.json of adapter folder `path`; CheckpointError when it is absent or unreadable."""
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}; a PEFT adapter folder holds {CONFIG_NAME} "
                              "and adapter_model.safetensors")
    try:
        return json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG_NAME}: cannot read it ({exc})") from None


def adapter_weight_file(path: Path) -> Path:
    """The weight file of adapter folder `path` (adapter_model.safetensors, else adapter_model.bin), which
    Checkpoint(path, adapter=True) maps; CheckpointError when the folder is not an adapter or has none."""
    if not is_adapter_folder(path):
        raise CheckpointError(f"{path}: not a PEFT adapter folder (no {CONFIG_NAME})")
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: has {CONFIG_NAME} but no adapter_model.safetensors or adapter_model.bin; "
                          "the adapter is incomplete")


def write_adapter_folder(out: Path, config: dict, tensors: dict[str, torch.Tensor], overwrite: bool,
                         extra_files: Mapping[str, str], protected: Sequence[str | os.PathLike] = ()) -> None:
    """Write the adapter folder through mergelab's output rules (checkpoint/output.py): never over an input or
    a folder mergelab did not write, built under a temporary name and renamed into place only when complete."""
    out = check_output(out, kind="folder", inputs=protected, overwrite=overwrite, what="adapter folder")
    tmp = partial_path(out)
    try:
        tmp.mkdir()
        (tmp / MARKER).write_text("written by mergelab; mergelab may replace it when told to overwrite\n")
        save_tensors(tmp / WEIGHT_NAMES[0], tensors, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in extra_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        replace_folder(tmp, out, overwrite=overwrite)
    except OSError as exc:
        raise CheckpointError(f"writing the adapter {out} failed ({exc.strerror or exc}); is the disk full? "
                              "nothing was written there") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
