"""Tiny dense Llama experts (trained here, once per session) and mergekit-moe configs over them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_kit import DOMAINS, sentences, write_experts


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    return write_experts(tmp_path_factory.mktemp("moe-experts"))


def positive_prompts(index: int, domain: str) -> list[str]:
    return sentences(domain, 8, seed=100 + index)


def held_out_prompts(index: int, domain: str) -> list[str]:
    return sentences(domain, 20, seed=500 + index)


def moe_config(family: dict[str, Path], **overrides) -> dict:
    """A mergekit-moe config: the trained base, one expert per domain with its prompts."""
    config = {"base_model": str(family["base"]), "gate_mode": "hidden", "dtype": "float32",
              "experts_per_token": 2,
              "experts": [{"source_model": str(family[d]), "positive_prompts": positive_prompts(i, d)}
                          for i, d in enumerate(DOMAINS)]}
    config.update(overrides)
    return config


def write_config(folder: Path, config: dict, name: str = "moe.yml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
