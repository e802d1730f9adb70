"""Toy models for the search tests: safetensors files holding one 2-vector `w`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TOY = Path(__file__).with_name("toy_eval.py")


def toy_spec(fn: str) -> str:
    return f"{TOY}:{fn}"


def write_vectors(root: Path, vectors: dict[str, tuple[float, float]]) -> dict[str, Path]:
    paths = {}
    for name, v in vectors.items():
        path = root / f"{name}.safetensors"
        save_file({"w": torch.tensor(v, dtype=torch.float32)}, str(path))
        paths[name] = path
    return paths


def linear_recipe(paths: dict[str, Path], w1, w2) -> dict:
    return {"merge_method": "linear", "parameters": {"normalize": False},
            "models": [{"model": str(paths["e1"]), "parameters": {"weight": w1}},
                       {"model": str(paths["e2"]), "parameters": {"weight": w2}}]}


@pytest.fixture
def unit_models(tmp_path) -> dict[str, Path]:
    """e1 = (1, 0) and e2 = (0, 1): a linear merge without normalisation is (w1, w2)."""
    return write_vectors(tmp_path, {"e1": (1.0, 0.0), "e2": (0.0, 1.0)})
