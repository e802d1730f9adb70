"""AdaMerging's objective: the Shannon entropy of the merged model's predictions on unlabelled inputs.

H = mean over predictions of -sum_c p_c log(p_c + eps),  p = softmax(logits),  eps = 1e-8,

FusionBench's `entropy_loss` (fusion_bench/method/adamerging/entropy_loss.py). A
classification head gives one prediction per example ((batch, classes) logits); an
LM head gives one per position, the next-token distributions ((batch, seq, vocab)
logits), averaged over the positions the attention mask keeps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mergelab.errors import MergeError

HEADS = ("auto", "classification", "lm")


def entropy(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean entropy of softmax(logits) over the rows of (N, C) logits (FusionBench's entropy_loss)."""
    if logits.dim() != 2:
        raise MergeError(f"entropy needs (N, classes) logits; got shape {tuple(logits.shape)}")
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -(probs * torch.log(probs + eps)).sum(dim=-1).mean()


def output_logits(output: Any) -> Tensor:
    """The logits of a model's output: the tensor itself, its .logits (transformers), or the first of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise MergeError(f"the model returned a {type(output).__name__} without logits; AdaMerging needs a "
                         "classification head ((batch, classes) logits) or an LM head ((batch, seq, vocab))")
    return logits


def prediction_rows(logits: Tensor, batch: Any, head: str = "auto") -> Tensor:
    """The (N, C) rows whose entropy is taken: classification logits as they are; for an LM head the
    next-token distribution at every position the batch's attention_mask keeps (all positions without one)."""
    if head not in HEADS:
        raise MergeError(f"head {head!r} is not one of {', '.join(HEADS)}", option="head")
    if head == "auto":
        head = "lm" if logits.dim() == 3 else "classification"
    if head == "classification":
        if logits.dim() != 2:
            raise MergeError(f"a classification head gives (batch, classes) logits; got {tuple(logits.shape)}",
                             option="head")
        return logits
    if logits.dim() != 3:
        raise MergeError(f"an LM head gives (batch, seq, vocab) logits; got {tuple(logits.shape)}", option="head")
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    rows = logits.reshape(-1, logits.shape[-1])
    if mask is None:
        return rows
    return rows[mask.reshape(-1).to(torch.bool)]
