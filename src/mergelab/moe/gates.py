"""Router (gate) weights of a mixture of experts built from dense models, without training.

Each layer's router is a matrix W (E, H) with one row per expert; a token whose
router input x gives the largest x . w_e goes to expert e. mergekit-moe
(Goddard et al., 2024, arXiv:2403.13257, "Arcee's MergeKit", and its
mergekit-moe tool) sets row e of layer l to a direction that tokens like the
expert's prompts point along:

    w_{l,e} = normalize( v_l(P_e) - v_l(N_e) ),   v_l(P) = mean_{p in P} s_l(p)

with P_e / N_e the expert's positive / negative prompts and s_l(p) one vector
per prompt at layer l:
- hidden, hidden_last: the base model's hidden state entering layer l at the
  prompt's last token;
- hidden_avg: the mean of that hidden state over the prompt's tokens;
- cheap_embed: the normalized sum of the prompt tokens' input embeddings,
  the same for every layer (no forward pass);
- random: N(0, 1) entries; uniform_random: U(-1/sqrt(H), 1/sqrt(H)), nn.Linear's
  initialisation (both meant for routers that will be trained).

The MoE layout itself is Mixtral's (Jiang et al., 2024, arXiv:2401.04088);
building one from dense copies is sparse upcycling (Komatsuzaki et al., 2022,
arXiv:2212.05055), from separately trained experts Branch-Train-MiX
(Sukhbaatar et al., 2024, arXiv:2403.07816), whose routers are trained instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["normalize_rows", "prompt_vectors", "gate_from_vectors", "cheap_embedding", "random_gates",
           "degenerate_layers", "tokenize_prompts", "layer_inputs"]


def normalize_rows(v: Tensor, eps: float = 1e-8) -> Tensor:
    """v / max(||v||_2, eps) along the last dimension."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=eps)


def prompt_vectors(states: Tensor, mask: Tensor, reduce: str) -> Tensor:
    """Mean over prompts of one vector per prompt and layer.

    Args:
        states: (L, B, T, H) hidden states entering each of L layers, B prompts
            left-padded to T tokens.
        mask: (B, T) 1 for real tokens, 0 for padding.
        reduce: "last" (the last token, real under left padding) or "mean"
            (the mean over real tokens only).

    Returns:
        (L, H) float32.
    """
    states = states.float()
    if reduce == "last":
        per_prompt = states[:, :, -1, :]                                  # (L, B, H)
    elif reduce == "mean":
        m = mask.to(states.dtype)[None, :, :, None]                       # (1, B, T, 1)
        per_prompt = (states * m).sum(dim=2) / m.sum(dim=2).clamp(min=1)  # (L, B, H)
    else:
        raise ValueError(f"reduce must be 'last' or 'mean', not {reduce!r}")
    return per_prompt.mean(dim=1)                                         # (L, H)


def gate_from_vectors(positive: Tensor, negative: Tensor | None) -> Tensor:
    """One expert's gate rows: normalize(positive - negative), per layer. (L, H) -> (L, H)."""
    v = positive if negative is None else positive - negative
    return normalize_rows(v)


def cheap_embedding(embed: Tensor, ids: Tensor, mask: Tensor, num_layers: int) -> Tensor:
    """Normalized sum of the prompt tokens' embeddings, repeated for each layer.

    Args:
        embed: (V, H) input embedding matrix.
        ids, mask: (B, T) token ids and attention mask of the prompts.

    Returns:
        (num_layers, H) float32, every row sum_{b,t} mask[b,t] embed[ids[b,t]] / ||.||.
    """
    rows = embed[ids].float() * mask[..., None].float()                   # (B, T, H)
    total = rows.sum(dim=(0, 1))                                          # (H,)
    return normalize_rows(total).expand(num_layers, -1).clone()           # (L, H)


def random_gates(num_layers: int, num_experts: int, hidden: int, mode: str, gen: torch.Generator) -> Tensor:
    """(L, E, H) router weights for `random` (N(0, 1)) or `uniform_random` (U(-1/sqrt(H), 1/sqrt(H)))."""
    shape = (num_layers, num_experts, hidden)
    if mode == "random":
        return torch.randn(shape, generator=gen)
    if mode == "uniform_random":
        bound = math.sqrt(1.0 / hidden)
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    raise ValueError(f"not a random gate mode: {mode!r}")


def degenerate_layers(gates: Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose (E, H) gate matrix has a condition number above `threshold` (mergekit's warning).

    Nearly parallel rows mean prompts too alike: one expert takes the tokens of another.
    """
    return [layer for layer in range(gates.shape[0])
            if torch.linalg.cond(gates[layer].float()).item() > threshold]


# -- running the base model ------------------------------------------------------------------


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Prompts as mergekit-moe feeds them: BOS text prefix, no other special tokens, left padding."""
    bos = tokenizer.bos_token or ""
    enc = tokenizer([bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def layer_inputs(model, batch: dict[str, Tensor]) -> Tensor:
    """(L, B, T, H): the hidden state entering each decoder layer (transformers' hidden_states[:-1])."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True, return_dict=True)
    # hidden_states holds the embeddings, then each layer's output; the last entry is the final
    # (normed) output, which enters no layer.
    return torch.stack(out.hidden_states[:-1])
