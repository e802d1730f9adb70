"""Tiny models and PEFT adapters built by the tests (nothing downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    """Linear, Conv1d, Conv2d, GPT-2 Conv1D and an embedding: every layer kind PEFT's LoRA adapts."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(11, 6)
        self.q = nn.Linear(6, 8)
        self.v = nn.Linear(8, 6)
        self.c1 = nn.Conv1d(6, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 4, (3, 2), padding=1)
        self.g = Conv1D(7, 4)  # GPT-2 style: weight (in=4, out=7)
        self.norm = nn.LayerNorm(7)

    def forward(self, ids):
        h = self.emb(ids)  # (b, t, 6)
        h = self.v(torch.tanh(self.q(h)))  # (b, t, 6)
        h = self.c1(h.transpose(1, 2))  # (b, 5, t)
        h = self.c2(h.unsqueeze(-1))  # (b, 4, t+2, 3)
        h = h.mean(dim=(2, 3))  # (b, 4)
        return self.norm(self.g(h))  # (b, 7)


LINEAR_TARGETS = ["q", "v", "g"]
ALL_TARGETS = ["q", "v", "c1", "c2", "g", "emb"]


def make_base(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def make_adapter(folder, seed: int, r: int, alpha: float, targets=ALL_TARGETS, rslora: bool = False, **kw):
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False), saved to `folder`."""
    from peft import LoraConfig, get_peft_model

    base = make_base()
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                     init_lora_weights=False, **kw)
    torch.manual_seed(seed)
    model = get_peft_model(base, cfg)
    model.save_pretrained(str(folder))
    return folder


def peft_delta(folder, module: str) -> torch.Tensor:
    """The update PEFT itself computes for `module` of the adapter in `folder` (its get_delta_weight)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(make_base(), str(folder))
    layer = model.base_model.model.get_submodule(module)
    return layer.get_delta_weight("default").detach().double()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 11, (3, 4), generator=g)
