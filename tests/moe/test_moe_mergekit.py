"""The same config through mergekit-moe 0.1.5 and `mergelab moe`: the same tensors.

Expert, attention, embedding and norm tensors are compared bit for bit. Gates:
- hidden: mergekit runs the base in bfloat16 and also averages and normalizes
  the hidden states in bfloat16; mergelab averages and normalizes in float32
  (with --gate-dtype bfloat16 the forward pass is mergekit's). The gates agree
  to bfloat16 rounding (max |diff| < 2^-8, cosine > 0.9999), not bit for bit.
- cheap_embed: both compute in float32: equal to float rounding.
- random: mergekit draws from the global torch RNG, mergelab from a generator
  seeded by (seed, tensor name): same shapes and distribution, other numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_kit import family, moe_config, write_config  # noqa: F401 (family: a fixture)
from mergelab.moe.build import build_moe

pytest.importorskip("mergekit", reason="mergekit-moe 0.1.5 is the reference (pip install mergelab[bench])")
pytestmark = pytest.mark.mergekit

BF16_STEP = 2.0 ** -8  # bfloat16's spacing just below 1; gate entries are in [-1, 1]


def _mergekit_moe(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    build(MoEMergeConfig.model_validate(config), str(out), MergeOptions(copy_tokenizer=False, quiet=True),
          device="cpu")
    return _load(out)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _both(tmp_path, config: dict, **kwargs) -> tuple[dict, dict]:
    theirs = _mergekit_moe(config, tmp_path / "mergekit")
    build_moe(write_config(tmp_path, config), tmp_path / "mergelab", progress=False, **kwargs)
    return theirs, _load(tmp_path / "mergelab")


def _check(theirs: dict, ours: dict, gate_atol: float) -> None:
    assert set(theirs) == set(ours)
    gates = [n for n in theirs if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))]
    assert len(gates) >= 3
    for name, t in theirs.items():
        if name in gates:
            assert (t - ours[name]).abs().max() <= gate_atol, name
            assert torch.nn.functional.cosine_similarity(t, ours[name]).min() > 0.9999, name
        else:
            assert torch.equal(t, ours[name]), name


@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float32])
def test_mixtral_hidden_gates(family, tmp_path, gate_dtype):
    theirs, ours = _both(tmp_path, moe_config(family), fused=True, gate_dtype=gate_dtype)
    assert "model.layers.2.mlp.experts.gate_up_proj" in ours
    _check(theirs, ours, gate_atol=BF16_STEP / 2 if gate_dtype == torch.bfloat16 else BF16_STEP)
    if gate_dtype == torch.bfloat16:
        _check_difference_is_bf16_averaging(family, theirs)


def _check_difference_is_bf16_averaging(family, theirs: dict) -> None:
    """The explanation, checked: our bf16 forward pass (same layer inputs), averaged and normalized in
    bfloat16 instead of float32, gives mergekit's gates bit for bit."""
    from transformers import AutoModelForCausalLM

    from mergelab.moe import gates as G
    from mergelab.moe.build import _tokenizer

    model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.bfloat16).eval()
    tok = _tokenizer(family["base"])
    for e, expert in enumerate(moe_config(family)["experts"]):
        states = G.layer_inputs(model, G.tokenize_prompts(tok, expert["positive_prompts"]))  # (L, B, T, H) bf16
        last = states[:, :, -1, :]
        v = last.sum(dim=1) / last.shape[1]                                # bf16 arithmetic
        v = v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        for layer in range(v.shape[0]):
            assert torch.equal(v[layer].float(), theirs[f"model.layers.{layer}.mlp.gate.weight"][e])


def test_mixtral_hidden_avg_gates_on_prompts_of_one_length(family, tmp_path):
    # mergekit's mean also counts the left padding of shorter prompts, mergelab's only real tokens:
    # with prompts of one length there is no padding, and the two must agree.
    from moe_kit import DOMAINS, sentence

    gen = torch.Generator().manual_seed(3)
    experts = [{"source_model": str(family[d]), "positive_prompts": [sentence(d, gen, length=7) for _ in range(6)]}
               for d in DOMAINS]
    theirs, ours = _both(tmp_path, moe_config(family, gate_mode="hidden_avg", experts=experts), fused=True,
                         gate_dtype=torch.bfloat16)
    _check(theirs, ours, gate_atol=BF16_STEP)  # mergekit sums each prompt's 8 positions in bfloat16 too


def test_mixtral_cheap_embed_gates(family, tmp_path):
    theirs, ours = _both(tmp_path, moe_config(family, gate_mode="cheap_embed"), fused=True)
    _check(theirs, ours, gate_atol=1e-6)


def test_qwen2_moe_with_shared_expert(family, tmp_path):
    config = moe_config(family, shared_experts=[{"source_model": str(family["base"]),
                                                 "positive_prompts": ["the and then with a"]}])
    theirs, ours = _both(tmp_path, config)  # mergekit writes Qwen2-MoE's experts one tensor each, as we do
    _check(theirs, ours, gate_atol=BF16_STEP)


def test_random_gates_differ_but_experts_match(family, tmp_path):
    theirs, ours = _both(tmp_path, moe_config(family, gate_mode="random"), fused=True, seed=0)
    assert set(theirs) == set(ours)
    for name, t in theirs.items():
        if name.endswith("mlp.gate.weight"):
            assert t.shape == ours[name].shape and not torch.equal(t, ours[name])
        else:
            assert torch.equal(t, ours[name]), name
