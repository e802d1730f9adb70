"""Built MoEs load in transformers, compute what their experts compute, and route prompts to their expert."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moe_kit import DOMAINS, family, held_out_prompts, moe_config, write_config  # noqa: F401 (family: a fixture)
from mergelab.moe.build import build_moe
from mergelab.moe.routing import load_moe, routing_shares

pytest.importorskip("transformers", reason="mergelab moe needs transformers (pip install mergelab[hf])")


def _build(tmp_path, config: dict, name: str = "out", **kwargs):
    return build_moe(write_config(tmp_path, config, f"{name}.yml"), tmp_path / name, progress=False, **kwargs)


@pytest.fixture(scope="module")
def mixtral(family, tmp_path_factory):
    return _build(tmp_path_factory.mktemp("mixtral"), moe_config(family)).out_dir


def test_mixtral_loads_and_generates(mixtral):
    from transformers import MixtralForCausalLM

    model, tok = load_moe(mixtral)
    assert isinstance(model, MixtralForCausalLM)
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    enc = tok(["<s>two plus three equals"], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, enc["input_ids"].shape[1] + 5)
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()
    report = json.loads((mixtral / "mergelab_report.json").read_text())
    assert report["output"] == "Mixtral" and len(report["dropped"]) == 9  # the base's 3 x 3 dense MLP matrices
    assert yaml.safe_load((mixtral / "mergekit_moe_config.yml").read_text())["gate_mode"] == "hidden"


def test_experts_are_the_dense_mlps_unchanged(family, mixtral):
    out = load_file(str(mixtral / "model.safetensors"))
    base = load_file(str(family["base"] / "model.safetensors"))
    for e, domain in enumerate(DOMAINS):
        dense = load_file(str(family[domain] / "model.safetensors"))
        for layer in range(3):
            for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                assert torch.equal(out[name], dense[f"model.layers.{layer}.mlp.{proj}.weight"])
    for name, t in base.items():  # everything outside the MLPs is the base's
        assert (".mlp." in name) != torch.equal(out.get(name, torch.empty(0)), t), name


def test_moe_of_one_model_computes_that_model(family, tmp_path):
    # Every expert the same dense model and it as the base: whatever the router picks, the
    # normalised top-k mixture is that model's MLP, so the MoE's logits are the dense model's.
    from transformers import AutoModelForCausalLM

    math = str(family["math"])
    config = moe_config(family, base_model=math, experts=[
        {"source_model": math, "positive_prompts": ["one plus two"]},
        {"source_model": math, "positive_prompts": ["bake the flour"]}])
    for fused in (False, True):
        folder = _build(tmp_path, config, name=f"same-{fused}", fused=fused, allow_all_same=True).out_dir
        moe, tok = load_moe(folder)
        dense = AutoModelForCausalLM.from_pretrained(math).eval()
        enc = tok(["<s>two plus three equals six", "<s>stir the dough"], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        with torch.no_grad():
            assert torch.allclose(moe(**enc).logits, dense(**enc).logits, atol=1e-5)


def test_hidden_gates_route_held_out_prompts_to_their_expert(family, mixtral, tmp_path):
    groups = {d: held_out_prompts(i, d) for i, d in enumerate(DOMAINS)}
    model, tok = load_moe(mixtral)
    shares = routing_shares(model, tok, groups, num_experts=3)
    for kind in ("tokens", "last"):
        right = torch.diagonal(shares[kind], dim1=1, dim2=2)               # (L, E): share of group e on expert e
        assert (right >= 0.9).all(), (kind, right)
    # Control: random gates (same experts) route by chance, about 1/3 of each group to its expert.
    rand = _build(tmp_path, moe_config(family, gate_mode="random"), name="random", seed=0).out_dir
    model, tok = load_moe(rand)
    right = torch.diagonal(routing_shares(model, tok, groups, num_experts=3)["tokens"], dim1=1, dim2=2)
    assert right.mean() < 0.6, right


def test_residual_and_noise_scale(family, tmp_path):
    config = moe_config(family)
    config["experts"][0]["residual_scale"] = 0.5
    config["experts"][1]["noise_scale"] = 0.01
    folder = _build(tmp_path, config, seed=7).out_dir
    out = load_file(str(folder / "model.safetensors"))
    math = load_file(str(family["math"] / "model.safetensors"))
    cooking = load_file(str(family["cooking"] / "model.safetensors"))
    prefix = "model.layers.1.block_sparse_moe.experts"
    assert torch.equal(out[f"{prefix}.0.w2.weight"], 0.5 * math["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(out[f"{prefix}.0.w1.weight"], math["model.layers.1.mlp.gate_proj.weight"])
    noise = out[f"{prefix}.1.w1.weight"] - cooking["model.layers.1.mlp.gate_proj.weight"]
    assert 0.008 < noise.std().item() < 0.012 and abs(noise.mean().item()) < 0.002


def test_qwen2_moe_with_a_shared_expert_loads_and_runs(family, tmp_path):
    from transformers import Qwen2MoeForCausalLM

    config = moe_config(family, shared_experts=[{"source_model": str(family["base"]),
                                                 "positive_prompts": ["the and then with"]}])
    result = _build(tmp_path, config)
    assert result.output == "Qwen MoE"
    model, tok = load_moe(result.out_dir)
    assert isinstance(model, Qwen2MoeForCausalLM)
    out = load_file(str(result.out_dir / "model.safetensors"))
    base = load_file(str(family["base"] / "model.safetensors"))
    assert torch.equal(out["model.layers.2.mlp.shared_expert.up_proj.weight"],
                       base["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.0.self_attn.q_proj.bias"], torch.zeros(32))  # a no-op, as mergekit
    enc = tok(["<s>bake the flour with sugar"], return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == enc["input_ids"].shape[1] + 4
    shares = routing_shares(model, tok, {d: held_out_prompts(i, d) for i, d in enumerate(DOMAINS)}, 3)
    assert (torch.diagonal(shares["tokens"], dim1=1, dim2=2) >= 0.9).all()


def _dense_family(tmp_path, model_cls, config, n: int = 3) -> list[str]:
    torch.manual_seed(0)
    paths = []
    for i in range(n):
        model = model_cls(config)
        paths.append(str(tmp_path / f"m{i}"))
        model.save_pretrained(paths[-1])
    return paths


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "llama-tied"])
def test_other_dense_architectures(kind, tmp_path):
    # Random gates need no tokenizer: these check the layout and config for each input kind.
    import transformers as tf

    from moe_kit import llama_config

    small = dict(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32)
    cls, config = {"mistral": (tf.MistralForCausalLM, tf.MistralConfig(sliding_window=16, **small)),
                   "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**small)),
                   "llama-tied": (tf.LlamaForCausalLM, llama_config(tie_word_embeddings=True, num_hidden_layers=2))
                   }[kind]
    base, *experts = _dense_family(tmp_path, cls, config)
    moe = {"base_model": base, "gate_mode": "random", "experts": [{"source_model": p} for p in experts]}
    if kind == "qwen2":
        moe["shared_experts"] = [{"source_model": base}]
    result = _build(tmp_path, moe, seed=0)
    model = tf.AutoModelForCausalLM.from_pretrained(result.out_dir).eval()
    assert type(model).__name__ == ("Qwen2MoeForCausalLM" if kind == "qwen2" else "MixtralForCausalLM")
    dense = cls.from_pretrained(base)
    out = load_file(str(result.out_dir / "model.safetensors"))
    for name, t in dense.state_dict().items():
        if ".mlp." not in name and name in out:
            assert torch.equal(out[name], t), name  # q/k/v biases of Qwen2 included
    if kind == "llama-tied":
        assert "lm_head.weight" not in out and model.config.tie_word_embeddings
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_nonfinite_expert_weights_are_refused(family, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "generation_config.json"):
        (broken / f).write_bytes((family["code"] / f).read_bytes())
    weights = load_file(str(family["code"] / "model.safetensors"))
    weights["model.layers.2.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    config = moe_config(family, gate_mode="random")
    config["experts"][2]["source_model"] = str(broken)
    from mergelab.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"model.layers.2.mlp.up_proj.weight of .*broken"):
        _build(tmp_path, config)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_fused_experts_are_the_per_expert_tensors_stacked(tmp_path):
    # One expert job per layer stacks what the per-expert jobs write: gate_up = [w1; w3], down = w2.
    import transformers as tf

    from moe_kit import llama_config

    base, *experts = _dense_family(tmp_path, tf.LlamaForCausalLM, llama_config(num_hidden_layers=2))
    moe = {"base_model": base, "gate_mode": "random", "experts": [{"source_model": p} for p in experts]}
    moe["experts"][1]["noise_scale"] = 0.01
    split = load_file(str(_build(tmp_path, moe, name="split", seed=3).out_dir / "model.safetensors"))
    fused = load_file(str(_build(tmp_path, moe, name="fused", seed=3, fused=True).out_dir / "model.safetensors"))
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        assert torch.equal(fused[f"model.layers.{layer}.mlp.gate.weight"], split[f"{prefix}.gate.weight"])
        for e in range(len(experts)):
            w = {k: split[f"{prefix}.experts.{e}.{k}.weight"] for k in ("w1", "w2", "w3")}
            stacked = f"model.layers.{layer}.mlp.experts"
            assert torch.equal(fused[f"{stacked}.gate_up_proj"][e], torch.cat([w["w1"], w["w3"]]))
            assert torch.equal(fused[f"{stacked}.down_proj"][e], w["w2"])
    assert set(split) - {n for n in split if ".block_sparse_moe." in n} == \
        set(fused) - {n for n in fused if ".mlp." in n}
