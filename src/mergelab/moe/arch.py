"""The two output architectures: their config.json and the names of their MoE tensors.

Mixtral (no shared expert) and Qwen2-MoE (one shared expert with a sigmoid
gate), as mergekit-moe 0.1.5 writes them. Expert tensors come in two layouts:

- per expert (default): the names Mixtral and Qwen2-MoE checkpoints on the Hub
  use (`block_sparse_moe.experts.3.w1.weight`, `mlp.experts.3.gate_proj.weight`);
  every transformers version and most other loaders read them (transformers 5
  fuses them on load);
- fused: transformers 5's in-memory layout, `mlp.experts.gate_up_proj` (E, 2I, H)
  holding [gate_proj; up_proj] of each expert and `mlp.experts.down_proj`
  (E, H, I), which is what mergekit 0.1.5 writes for Mixtral.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["output_config", "router_names", "expert_names"]

# mergekit's (w1, w2, w3) names of Mixtral's expert matrices, from the dense MLP's.
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_DROP_KEYS = ("architectures", "model_type", "auto_map", "_name_or_path", "transformers_version")


def output_config(base: dict[str, Any], output: str, num_experts: int, experts_per_token: int,
                  dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the MoE: the base's settings in the output's config class, plus the MoE fields.

    As mergekit-moe: Mixtral and Qwen2-MoE drop sliding-window attention; Qwen2-MoE's
    experts and shared expert take the dense intermediate size and top-k
    probabilities are renormalised (norm_topk_prob).
    """
    import transformers

    fields = {k: v for k, v in base.items() if k not in _DROP_KEYS}
    fields.pop("torch_dtype", None)
    fields.pop("dtype", None)
    if output == "Mixtral":
        cfg = transformers.MixtralConfig(**fields)
        cfg.architectures = ["MixtralForCausalLM"]
        cfg.num_local_experts = num_experts
        cfg.num_experts_per_tok = experts_per_token
        cfg.sliding_window = None
    else:
        cfg = transformers.Qwen2MoeConfig(**fields)
        cfg.architectures = ["Qwen2MoeForCausalLM"]
        cfg.num_experts = num_experts
        cfg.num_experts_per_tok = experts_per_token
        cfg.decoder_sparse_step = 1
        cfg.mlp_only_layers = []
        cfg.norm_topk_prob = True
        cfg.sliding_window = None
        cfg.use_sliding_window = False
        cfg.qkv_bias = True  # Qwen2-MoE attention always has q/k/v biases (zeros when the base has none)
        cfg.moe_intermediate_size = cfg.shared_expert_intermediate_size = base["intermediate_size"]
    out = cfg.to_diff_dict()  # only what differs from the class defaults, as save_pretrained writes
    out["torch_dtype"] = out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def router_names(output: str, layer: int, fused: bool) -> tuple[str, str | None]:
    """(router weight (E, H), shared expert's gate (1, H) or None) of `layer`."""
    if output == "Mixtral":
        block = "mlp" if fused else "block_sparse_moe"
        return f"model.layers.{layer}.{block}.gate.weight", None
    return f"model.layers.{layer}.mlp.gate.weight", f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def expert_names(output: str, layer: int, expert: int | None, fused: bool) -> dict[str, str]:
    """Output tensor of each dense MLP matrix of routed `expert` (None: the shared expert) in `layer`.

    Per expert: {gate_proj, up_proj, down_proj} -> a tensor each. Fused: {gate_up, down} -> the
    layer's stacked tensors, in which this expert is row `expert` of dim 0.
    """
    mlp = f"model.layers.{layer}.mlp"
    if expert is None:
        return {proj: f"{mlp}.shared_expert.{proj}.weight" for proj in MIXTRAL_NAMES}
    if fused:
        return {"gate_up": f"{mlp}.experts.gate_up_proj", "down": f"{mlp}.experts.down_proj"}
    if output == "Mixtral":
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return {proj: f"{prefix}.{w}.weight" for proj, w in MIXTRAL_NAMES.items()}
    return {proj: f"{mlp}.experts.{expert}.{proj}.weight" for proj in MIXTRAL_NAMES}
