"""Where a built MoE sends tokens: the top-1 expert of each layer's router, counted per group of prompts.

A check of gates made without training: prompts like expert e's positive
prompts should reach expert e. `routing_shares` runs the MoE (any transformers
model whose forward returns `router_logits`, e.g. Mixtral, Qwen2-MoE) and
returns, per layer, the share of each group's tokens whose top-1 expert is e.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mergelab.moe.gates import tokenize_prompts

__all__ = ["top1_choices", "routing_shares", "load_moe"]


def load_moe(folder: str | Path, device: str = "cpu"):
    """(model, tokenizer) of a built MoE folder, tokenizer set up as the gates were made (left padding, BOS pad)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.padding_side = "left"
    tok.pad_token = tok.bos_token or tok.pad_token or tok.eos_token
    return model, tok


def top1_choices(model, tokenizer, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Top-1 expert per layer: (L, N) for the N real tokens after each prompt's BOS, and (L, B) for last tokens."""
    batch = tokenize_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()}, output_router_logits=True)
    mask = batch["attention_mask"].bool()                                  # (B, T)
    first = mask.long().cumsum(dim=1) == 1                                 # each prompt's BOS
    B, T = mask.shape
    tokens, last = [], []
    for logits in out.router_logits:                                       # per layer (B * T, E)
        choice = logits.float().view(B, T, -1).argmax(dim=-1).cpu()       # (B, T)
        tokens.append(choice[mask & ~first])
        last.append(choice[:, -1])
    return torch.stack(tokens), torch.stack(last)


def routing_shares(model, tokenizer, groups: Mapping[str, Sequence[str]], num_experts: int) -> dict[str, Tensor]:
    """Per layer, the share of each group's tokens (and last tokens) whose top-1 expert is e.

    Returns:
        {"tokens": (L, G, E), "last": (L, G, E)}, rows summing to 1, groups in the order given.
    """
    tokens, last = [], []
    for prompts in groups.values():
        t, l_ = top1_choices(model, tokenizer, list(prompts))
        tokens.append(_shares(t, num_experts))
        last.append(_shares(l_, num_experts))
    return {"tokens": torch.stack(tokens, dim=1), "last": torch.stack(last, dim=1)}


def _shares(choices: Tensor, num_experts: int) -> Tensor:
    """(L, N) expert ids -> (L, E) shares."""
    counts = torch.stack([torch.bincount(row, minlength=num_experts) for row in choices])
    return counts.float() / counts.sum(dim=1, keepdim=True).clamp(min=1)
