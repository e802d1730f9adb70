"""Recipes: MergeKit's format, parameter resolution, and every validation error naming its field."""

from __future__ import annotations

import pytest
import torch

from mergelab.errors import RecipeError
from mergelab.recipe import evaluate_setting, load_recipe


def _ties(tmp_path, **extra):
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir(exist_ok=True)
    recipe = {
        "merge_method": "ties", "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": str(tmp_path / "b"), "parameters": {"weight": 0.5, "density": [1.0, 0.7, 0.1]}}],
    }
    recipe.update(extra)
    return recipe


def test_gradient_interpolation_by_hand():
    assert evaluate_setting([0, 1], "x", 0.25) == pytest.approx(0.25)
    # [1, 0.7, 0.1] at t = 0.75: position 1.5 between 0.7 and 0.1 -> 0.4
    assert evaluate_setting([1, 0.7, 0.1], "x", 0.75) == pytest.approx(0.4)
    assert evaluate_setting([True, False], "x", 0.4) is True  # non-numeric lists pick, never interpolate


def test_filters_first_match_wins_and_substring_semantics():
    setting = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0, 1]}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.3
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, "model.norm.weight", 0.5) == 0.9
    # MergeKit's filters are substrings: "layers.1" also matches "layers.10" (use "layers.1." to avoid it).
    assert evaluate_setting([{"filter": "layers.1", "value": 1.0}], "model.layers.10.mlp", 0) == 1.0
    assert evaluate_setting([{"filter": "layers.1.", "value": 1.0}], "model.layers.10.mlp", 0) is None


def test_model_level_overrides_global(tmp_path):
    r = load_recipe(_ties(tmp_path, parameters={"density": 0.9, "normalize": False}))
    a = str(tmp_path / "a")
    got = r.parameters_for("model.layers.0.mlp.weight", 0.0, a)
    assert got["density"] == 0.5 and got["normalize"] is False and got["weight"] == 0.5
    b = str(tmp_path / "b")
    assert r.parameters_for("model.layers.0.mlp.weight", 0.75, b)["density"] == pytest.approx(0.4)


def test_yaml_text_file_and_dict_agree(tmp_path):
    import yaml

    d = _ties(tmp_path)
    text = yaml.safe_dump(d)
    f = tmp_path / "r.yml"
    f.write_text(text)
    recipes = [load_recipe(d), load_recipe(text), load_recipe(f), load_recipe(str(f))]
    assert all(yaml.safe_load(r.to_yaml()) == d for r in recipes)
    assert recipes[2].source_name == "r.yml"


def test_unknown_parameter_suggests_the_closest(tmp_path):
    d = _ties(tmp_path)
    d["models"][1]["parameters"] = {"weight": 0.5, "densty": 0.5}
    with pytest.raises(RecipeError) as err:
        load_recipe(d)
    msg = str(err.value)
    assert "models[1].parameters.densty" in msg and "did you mean 'density'" in msg
    assert "Parameters of ties:" in msg and "lambda" in msg


def test_unknown_method_and_field_suggest(tmp_path):
    with pytest.raises(RecipeError, match="did you mean 'ties'"):
        load_recipe(_ties(tmp_path, merge_method="tiez"))
    with pytest.raises(RecipeError, match="did you mean 'base_model'"):
        load_recipe(_ties(tmp_path, base_modle="x"))


def test_all_problems_are_reported_together(tmp_path):
    d = _ties(tmp_path)
    d["models"][0]["parameters"]["density"] = 1.5
    d["models"][1]["parameters"]["weight"] = "heavy"
    d["models"].append({"model": str(tmp_path / "missing"), "parameters": {"weight": 1}})
    with pytest.raises(RecipeError) as err:
        load_recipe(d)
    problems = err.value.problems
    assert any("models[0].parameters.density" in p and "1.5" in p for p in problems)
    assert any("models[1].parameters.weight" in p for p in problems)
    assert any("missing" in p and "does not exist" in p for p in problems)


def test_density_bounds_checked_at_every_gradient_endpoint(tmp_path):
    d = _ties(tmp_path)
    d["models"][1]["parameters"]["density"] = [1.0, 0.0]
    with pytest.raises(RecipeError, match=r"models\[1\].parameters.density: 0.0"):
        load_recipe(d)


def test_method_needs_base_and_model_counts(tmp_path):
    d = _ties(tmp_path)
    del d["base_model"]
    with pytest.raises(RecipeError, match="base_model: ties needs a base model"):
        load_recipe(d)
    slerp = {"merge_method": "slerp", "base_model": str(tmp_path / "base"), "parameters": {"t": 0.5},
             "models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}]}
    with pytest.raises(RecipeError, match="exactly 1 model"):
        load_recipe(slerp)


def test_required_weight_and_shared_scope(tmp_path):
    d = _ties(tmp_path)
    del d["models"][0]["parameters"]["weight"]
    with pytest.raises(RecipeError, match=r"models\[0\].parameters.weight is required"):
        load_recipe(d)
    d = _ties(tmp_path)
    d["models"][0]["parameters"]["normalize"] = False
    with pytest.raises(RecipeError, match="shared parameter"):
        load_recipe(d)


def test_hub_ids_and_lora_references_are_explained(tmp_path):
    d = _ties(tmp_path)
    d["models"][0]["model"] = "meta-llama/Llama-3-8B"
    d["models"][1]["model"] = str(tmp_path / "a") + "+" + str(tmp_path / "lora")
    with pytest.raises(RecipeError) as err:
        load_recipe(d)
    msg = str(err.value)
    assert "downloads nothing" in msg and "lora" in msg.lower()


def test_slices_normalised_and_validated(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    d = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tmp_path / "a"), "layer_range": [0, 4]}]},
        {"sources": [{"model": str(tmp_path / "b"), "layer_range": [2, 6]}]}]}
    r = load_recipe(d)
    slices = r.output_slices()
    assert [s.sources[0].layer_range for s in slices] == [(0, 4), (2, 6)]
    d["slices"][1]["sources"][0]["layer_range"] = [5, 3]
    with pytest.raises(RecipeError, match=r"slices\[1\].sources\[0\].layer_range"):
        load_recipe(d)
    d["models"] = [{"model": str(tmp_path / "a")}]
    with pytest.raises(RecipeError, match="models and slices are both given"):
        load_recipe(d)


def test_base_appended_when_the_method_uses_one(tmp_path):
    r = load_recipe(_ties(tmp_path))
    assert [s.model for s in r.output_slices()[0].sources][-1] == str(tmp_path / "base")
    assert r.input_paths()[0] == str(tmp_path / "base")


def test_dtypes_and_union_tokenizer(tmp_path):
    r = load_recipe(_ties(tmp_path, dtype="bfloat16"))
    assert r.compute_dtype == torch.float32 and r.out_dtype == torch.bfloat16
    assert load_recipe(_ties(tmp_path, dtype="float64")).compute_dtype == torch.float64
    with pytest.raises(RecipeError, match="union"):
        load_recipe(_ties(tmp_path, tokenizer_source="union"))
    with pytest.raises(RecipeError, match="dtype"):
        load_recipe(_ties(tmp_path, out_dtype="float7"))


MERGEKIT_EXAMPLES = [
    """
models:
  - model: {a}
    parameters: {{density: [1, 0.7, 0.1], weight: 1.0}}
  - model: {b}
    parameters: {{density: 0.5, weight: [0, 0.3, 0.7, 1]}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true, int8_mask: true}}
dtype: float16
""",
    """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 32]
      - model: {b}
        layer_range: [0, 32]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    """
models:
  - model: {base}
  - model: {a}
    parameters: {{density: 0.53, weight: 0.4}}
  - model: {b}
    parameters: {{density: 0.53, weight: 0.3}}
merge_method: dare_ties
base_model: {base}
parameters: {{int8_mask: true}}
dtype: bfloat16
""",
]


@pytest.mark.parametrize("text", MERGEKIT_EXAMPLES)
def test_mergekit_example_recipes_load_unchanged(text, tmp_path):
    paths = {n: tmp_path / n for n in ("base", "a", "b")}
    for p in paths.values():
        p.mkdir()
    r = load_recipe(text.format(**{k: str(v) for k, v in paths.items()}))
    assert r.method.name in ("ties", "slerp", "dare_ties")
