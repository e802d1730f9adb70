"""Shared fixtures: tiny Hugging Face checkpoints written by the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from suite_marks import mark_items

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# One numba cache for every test process (and the CLI subprocesses, which inherit it): compiled kernels
# are reused between runs; set before any test module imports numba. Ignored by git.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".numba_cache"))


def pytest_collection_modifyitems(items):
    """Marks by what a test does (subprocess, distributed, fault, slow): see suite_marks.py."""
    mark_items(items)


@pytest.fixture(scope="session", autouse=True)
def _private_method_catalog(tmp_path_factory):
    """`mergelab methods` caches its catalog; tests (and their subprocesses) use a folder of their own, not ~/.cache."""
    before = os.environ.get("MERGELAB_CACHE")
    os.environ["MERGELAB_CACHE"] = str(tmp_path_factory.mktemp("mergelab-cache"))
    yield
    if before is None:
        os.environ.pop("MERGELAB_CACHE", None)
    else:
        os.environ["MERGELAB_CACHE"] = before


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
              max_position_embeddings=64)
    kw.update(overrides)
    return LlamaConfig(**kw)


def write_llama_family(root: Path, names=("base", "a", "b", "c"), dtype=torch.float32,
                       scale: float = 0.05, **config) -> dict[str, Path]:
    """A base tiny Llama and fine-tunes = base + N(0, scale * |w|) noise, saved as HF folders."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(**config)).to(dtype)
    paths = {}
    sd = base.state_dict()
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(100 + i)
        model = LlamaForCausalLM(tiny_llama_config(**config)).to(dtype)
        new = {}
        for k, v in sd.items():
            if i == 0 or not v.is_floating_point():
                new[k] = v.clone()
            else:
                noise = torch.randn(v.shape, generator=g, dtype=torch.float32) * scale
                new[k] = (v.float() + noise * (v.float().abs().mean() + 1e-3)).to(dtype)
        model.load_state_dict(new)
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    return write_llama_family(tmp_path_factory.mktemp("llama"))


class TinyTokens(torch.utils.data.Dataset):
    """Random token sequences as a causal-LM training set (labels = inputs, as HF shifts them)."""

    def __init__(self, n=16, length=8, vocab=96):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
