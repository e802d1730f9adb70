"""Adapters in recipes: full-model merges, model+lora inputs and adapter outputs, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

import mergelab
from mergelab.errors import CheckpointError, MergeError, RecipeError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base folder, [adapter folders], [merged-and-unloaded model folders])."""
    root = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(root / "base")
    adapters, merged = [], []
    for i, r in enumerate((4, 2)):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=TARGETS, init_lora_weights=False,
                              use_rslora=bool(i))
        model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(root / "base"), cfg)
        model.save_pretrained(root / f"lora{i}")
        model.merge_and_unload().save_pretrained(root / f"full{i}")
        adapters.append(root / f"lora{i}")
        merged.append(root / f"full{i}")
    return root / "base", adapters, merged


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _sd(folder):
    return {k: v.double() for k, v in _load(folder).state_dict().items()}


def _ids():
    return torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))


def test_adapters_over_base_give_the_full_merged_model(llama, tmp_path):
    base, (a, b), (fa, fb) = llama
    weights = (0.7, -0.3)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(a), "parameters": {"weight": weights[0]}},
                         {"model": str(b), "parameters": {"weight": weights[1]}}]}
    mergelab.merge(recipe, tmp_path / "out")
    got, sb, sa, sbb = _sd(tmp_path / "out"), _sd(base), _sd(fa), _sd(fb)
    for name, w in sb.items():  # theta = base + sum_i w_i (merge_and_unload_i - base)
        ref = w + weights[0] * (sa[name] - w) + weights[1] * (sbb[name] - w)
        torch.testing.assert_close(got[name], ref, atol=1e-5, rtol=1e-5)
    ref_model = _load(base)
    ref_model.load_state_dict({k: v.float() for k, v in got.items()})
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "out")(_ids()).logits, ref_model(_ids()).logits)


def test_model_plus_lora_equals_merging_the_explicitly_merged_models(llama, tmp_path):
    base, (a, b), (fa, fb) = llama
    def recipe(m0, m1):
        return {"merge_method": "linear", "models": [{"model": m0, "parameters": {"weight": 0.25}},
                                                     {"model": m1, "parameters": {"weight": 0.75}}]}
    mergelab.merge(recipe(f"{base}+{a}", f"{base}+{b}"), tmp_path / "lora")
    mergelab.merge(recipe(str(fa), str(fb)), tmp_path / "full")
    got, ref = _sd(tmp_path / "lora"), _sd(tmp_path / "full")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5)


def test_adapter_recipe_writes_a_peft_adapter(llama, tmp_path):
    base, (a, b), (fa, fb) = llama
    yml = tmp_path / "r.yml"
    yml.write_text(f"""merge_method: ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.4, density: 0.5}}}}
adapter: {{rank: 3}}
""")
    mergelab.merge(yml, tmp_path / "ad")
    model = peft.PeftModel.from_pretrained(_load(base), str(tmp_path / "ad"))
    sb, sa, sbb = _sd(base), _sd(fa), _sd(fb)
    name = "model.layers.1.self_attn.q_proj"
    d = [(s[f"{name}.weight"] - sb[f"{name}.weight"]).float() for s in (sa, sbb)]
    dense = mergelab.merge_tensors("ties", d, base=torch.zeros_like(d[0]), weight=[0.6, 0.4], density=0.5).double()
    u, s, vh = torch.linalg.svd(dense)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    got = model.base_model.model.get_submodule(name).get_delta_weight("default").double()
    torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4)


def test_cat_adapter_recipe_matches_full_model_recipe(llama, tmp_path):
    base, (a, b), _ = llama
    models = [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": -0.5}}]
    mergelab.merge({"merge_method": "task_arithmetic", "base_model": str(base), "models": models,
                    "adapter": {"combine": "cat"}}, tmp_path / "cat")
    mergelab.merge({"merge_method": "task_arithmetic", "base_model": str(base), "models": models}, tmp_path / "full")
    merged = peft.PeftModel.from_pretrained(_load(base), str(tmp_path / "cat")).merge_and_unload()
    ref = _sd(tmp_path / "full")
    for name, t in merged.state_dict().items():
        torch.testing.assert_close(t.double(), ref[name], atol=1e-5, rtol=1e-5)


def test_recipe_errors_are_one_line_and_write_nothing(llama, tmp_path):
    base, (a, _), _ = llama
    with pytest.raises(RecipeError, match="model\\+lora.*the adapter .* not found"):
        mergelab.merge({"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path}/nope",
                                                              "parameters": {"weight": 1.0}}]}, tmp_path / "o")
    with pytest.raises(CheckpointError, match="needs `base_model:`"):
        mergelab.merge({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}]},
                       tmp_path / "o")
    other = tmp_path / "other"  # a base without the adapted modules' shapes
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(other)
    with pytest.raises(MergeError, match="another base model"):
        mergelab.merge({"merge_method": "task_arithmetic", "base_model": str(other),
                        "models": [{"model": str(a), "parameters": {"weight": 1.0}}], "adapter": {"rank": 2}},
                       tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_applied_checkpoint_rows_and_cli_adapter_recipe(llama, tmp_path):
    from mergelab.lora.applied import AppliedLoraCheckpoint

    base, (a, _), (fa, _) = llama
    ck = AppliedLoraCheckpoint(base, a)
    name = "model.layers.0.mlp.down_proj.weight"
    full = _sd(fa)[name]
    torch.testing.assert_close(ck[name].double(), full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ck.view(name, (3, 9)).double(), full[3:9], atol=1e-6, rtol=1e-5)
    yml = tmp_path / "r.yml"
    yml.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                   f"  - {{model: {a}, parameters: {{weight: 1.0}}}}\nadapter: {{combine: cat}}\n")
    from typer.testing import CliRunner

    from mergelab.cli.main import app

    run = CliRunner().invoke(app, ["merge", str(yml), str(tmp_path / "o"), "--quiet"])
    assert run.exit_code == 0, run.output
    assert (tmp_path / "o" / "adapter_config.json").is_file()


def test_an_adapter_as_base_model_is_refused(llama, tmp_path):
    base, (a, b), _ = llama
    with pytest.raises(CheckpointError, match="is a LoRA adapter, not a model"):
        mergelab.merge({"merge_method": "task_arithmetic", "base_model": str(a),
                        "models": [{"model": str(b), "parameters": {"weight": 1.0}}]}, tmp_path / "o")
    assert not (tmp_path / "o").exists()
