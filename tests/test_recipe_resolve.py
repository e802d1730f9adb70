"""mergelab.recipe.resolve: what each input of a validated recipe reads (Hub ids: tests/test_hub.py)."""

from __future__ import annotations

import json

from mergelab.recipe import ModelInput, load_recipe, resolve


def _folder(path, *files):
    path.mkdir()
    for name in files:
        (path / name).write_text(json.dumps({}))
    return str(path)


def test_inputs_are_models_model_plus_lora_and_adapters_over_the_base(tmp_path):
    base = _folder(tmp_path / "base", "config.json")
    model = _folder(tmp_path / "model", "config.json")
    lora = _folder(tmp_path / "lora", "adapter_config.json")
    other = _folder(tmp_path / "other-lora", "adapter_config.json")
    rec = load_recipe({"merge_method": "linear", "base_model": base,
                       "models": [{"model": f"{model}+{lora}", "parameters": {"weight": 1.0}},
                                  {"model": other, "parameters": {"weight": 1.0}}]})
    resolved = resolve(rec)
    assert resolved.recipe.paths == rec.paths
    assert list(resolved.inputs.values()) == [ModelInput(base, base), ModelInput(f"{model}+{lora}", model, lora),
                                              ModelInput(other, base, other)]


def test_an_adapter_without_a_base_model_has_no_model_to_apply_to(tmp_path):
    model = _folder(tmp_path / "model", "config.json")
    lora = _folder(tmp_path / "lora", "adapter_config.json")
    rec = load_recipe({"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}},
                                                            {"model": lora, "parameters": {"weight": 1.0}}]})
    assert resolve(rec).inputs == {model: ModelInput(model, model), lora: ModelInput(lora, None, lora)}
