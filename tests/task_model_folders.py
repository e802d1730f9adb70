"""Tiny model folders for the tall_masks / emr tests: a base and fine-tunes saved as checkpoint folders.

    tiny_state_dicts(n, seed)        -> (base, [fine-tune, ...]) float32 state dicts (two Linear layers)
    save_folders(root, base, fts)    -> (base folder, [fine-tune folders]) named base, task0, task1, ...
    recipe(method, base, fts, **p)   -> the recipe dict of a merge of those folders (float32 output)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {"l0.weight": (16, 8), "l0.bias": (16,), "l1.weight": (4, 16), "l1.bias": (4,)}


def tiny_state_dicts(n: int = 3, seed: int = 0, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, fts


def save_folders(root: Path, base: dict, fts: list[dict]) -> tuple[str, list[str]]:
    def save(name: str, sd: dict) -> str:
        folder = root / name
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"architectures": ["Tiny"]}))
        return str(folder)

    return save("base", base), [save(f"task{i}", sd) for i, sd in enumerate(fts)]


def recipe(method: str, base: str, fts: list[str], **params) -> dict:
    out = {"merge_method": method, "base_model": base, "dtype": "float32", "models": [{"model": m} for m in fts]}
    if params:
        out["parameters"] = params
    return out
