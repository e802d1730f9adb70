"""`align`: bring model B (or several models) into model A's basis of hidden units.

The returned copy of B computes the same function as B (every permuted axis moves
with its group), but its units line up with A's, so that averaging or interpolating
A and the aligned B stays near both (linear mode connectivity modulo permutation:
Entezari et al., 2021, arXiv:2110.06296; Ainsworth et al., 2022, arXiv:2209.04836).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from mergelab.align.hf import spec_for_hf
from mergelab.align.matching import MatchResult, activation_matching, weight_matching
from mergelab.align.spec import PermutationSpec, apply_permutations
from mergelab.align.trace import spec_from_module
from mergelab.errors import MergeError, ShapeMismatch

METHODS = ("weight_matching", "activation_matching")
_ALIASES = {"weight": "weight_matching", "activation": "activation_matching", "wm": "weight_matching",
            "am": "activation_matching"}


def spec_for(model: nn.Module | Mapping[str, Tensor], config: Any = None) -> PermutationSpec:
    """The permutation spec of a model: from its transformers config if it has one of a supported
    type (BERT, Llama, Mistral, Qwen2, GPT-2), else from a torch.fx trace of the module."""
    config = config if config is not None else getattr(model, "config", None)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    if config is not None:
        return spec_for_hf(config, {k: tuple(v.shape) for k, v in state.items()})
    if isinstance(model, nn.Module):
        return spec_from_module(model)
    raise MergeError("a state dict needs a PermutationSpec (spec=...) or its transformers config (config=...)")


def check_pair(spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
    """Both models fit the spec and have the same tensor names and shapes (alignment needs equal widths)."""
    spec.check(state_a, "model A")
    if set(state_a) != set(state_b):
        spec.check(state_b, "model B")  # names the tensors B lacks or adds
    for k, t in state_a.items():
        if tuple(t.shape) != tuple(state_b[k].shape):
            raise ShapeMismatch(f"tensor {k} has shape {tuple(t.shape)} in model A and {tuple(state_b[k].shape)} "
                                "in model B; permutation alignment needs models of equal widths "
                                "(ZipIt, mergelab.align.zipit, merges models of different widths)")


def align(model_a: nn.Module | Mapping[str, Tensor], model_b: nn.Module | Mapping[str, Tensor],
          method: str = "weight_matching", *, spec: PermutationSpec | None = None, data=None,
          config: Any = None, max_sweeps: int = 100, tol: float = 1e-3, seed: int = 0,
          return_result: bool = False):
    """Permute B's hidden units into A's basis.

    Args:
        model_a: the reference (nn.Module or state dict).
        model_b: the model to align, of the same architecture and widths.
        method: "weight_matching" (no data needed) or "activation_matching" (needs `data`
            and nn.Modules); "weight"/"activation" are accepted too.
        spec: the permutation groups; derived from the model when omitted (see spec_for).
        data: inputs for activation matching (tensor, list of batches, DataLoader).
        config: transformers config for state dicts of a supported architecture.
        max_sweeps, tol, seed: weight matching's coordinate descent (see weight_matching).
        return_result: also return the MatchResult (objective history).

    Returns:
        (aligned_b, perms): a copy of B of B's type (a module stays a module, B itself is
        not changed) and group -> permutation, B_aligned[i] = B[perms[g][i]]; with
        return_result, (aligned_b, perms, result).
    """
    method = _ALIASES.get(method, method)
    if method not in METHODS:
        raise MergeError(f"unknown alignment method {method!r}; choose weight_matching or activation_matching")
    state_a = model_a.state_dict() if isinstance(model_a, nn.Module) else dict(model_a)
    state_b = model_b.state_dict() if isinstance(model_b, nn.Module) else dict(model_b)
    spec = spec if spec is not None else spec_for(model_a, config)
    check_pair(spec, state_a, state_b)
    if method == "weight_matching":
        result = weight_matching(spec, state_a, state_b, max_sweeps=max_sweeps, tol=tol, seed=seed)
    else:
        if not (isinstance(model_a, nn.Module) and isinstance(model_b, nn.Module)) or data is None:
            raise MergeError("activation matching runs the models: pass two nn.Modules and data=")
        result = activation_matching(spec, model_a, model_b, data)
    aligned = {k: v.clone() for k, v in apply_permutations(spec, state_b, result.perms).items()}
    if isinstance(model_b, nn.Module):
        out = copy.deepcopy(model_b)
        out.load_state_dict(aligned)
    else:
        out = aligned
    return (out, result.perms, result) if return_result else (out, result.perms)


def align_many(reference, models: Sequence, method: str = "weight_matching", **kwargs) -> list[tuple[Any, dict]]:
    """Align every model to one reference (for merges of more than two models); returns
    [(aligned model, perms), ...] in the order of `models`. The spec is derived once."""
    if kwargs.get("spec") is None:
        kwargs["spec"] = spec_for(reference, kwargs.get("config"))
    return [align(reference, m, method, **kwargs)[:2] for m in models]


__all__ = ["align", "align_many", "spec_for", "check_pair", "MatchResult", "METHODS"]
