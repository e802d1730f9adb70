"""Recipes: MergeKit's format, per-tensor parameter resolution, and every validation error.

Toy methods registered by the `toy` fixture keep these tests independent of the
real method modules; tests that name real methods skip if one is not registered.
References: hand-worked values, numpy.interp, and MergeKit 0.1.5's own
evaluate_setting / resolve_parameter / MergeConfiguration on the same input.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field, TypeAdapter

from mergelab.errors import RecipeError
from mergelab.methods import REGISTRY, MethodParams, MethodSpec, NoParams
from mergelab.recipe import OutputSlice, Source, load_recipe, resolve
from mergelab.recipe.params import evaluate_setting

FAST = settings(max_examples=25, deadline=None)


class _TiesModel(MethodParams):
    weight: float
    density: float = Field(1.0, gt=0, le=1)


class _TiesShared(MethodParams):
    normalize: bool = True
    lambda_: float = Field(1.0, alias="lambda")


class _SlerpShared(MethodParams):
    t: float = Field(ge=0, le=1)


class _LinearModel(MethodParams):
    weight: float


class _IterShared(MethodParams):
    max_iter: int = Field(10, ge=0)


def _spec(name, model=NoParams, shared=NoParams, base="ignored", lo=1, hi=None, stats=False) -> MethodSpec:
    return MethodSpec(name, lambda *a, **k: None, model, shared, base, lo, hi, False, True, stats, "")


@pytest.fixture
def toy(monkeypatch):
    for spec in (_spec("_test_ties", _TiesModel, _TiesShared, base="required"),
                 _spec("_test_slerp", shared=_SlerpShared, base="required", hi=1),
                 _spec("_test_linear", _LinearModel),
                 _spec("_test_iter", shared=_IterShared),
                 _spec("_test_stats", stats=True)):
        monkeypatch.setitem(REGISTRY, spec.name, spec)


@pytest.fixture
def dirs(tmp_path) -> dict[str, str]:
    out = {}
    for name in ("base", "a", "b", "c"):
        (tmp_path / name).mkdir()
        out[name] = str(tmp_path / name)
    return out


def _real(*names: str) -> None:
    missing = [n for n in names if n not in REGISTRY]
    if missing:
        pytest.skip(f"method(s) {missing} not registered yet")


def _ties(d, **extra) -> dict:
    recipe = {"merge_method": "_test_ties", "base_model": d["base"],
              "models": [{"model": d["a"], "parameters": {"weight": 0.5, "density": 0.5}},
                         {"model": d["b"], "parameters": {"weight": 0.5, "density": [1.0, 0.7, 0.1]}}]}
    recipe.update(extra)
    return recipe


def _problems(source, **kw) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe(source, **kw)
    return err.value.problems


def _one(source, *fragments, **kw) -> str:
    """The single problem reported; it must contain every fragment (field path, value, hint)."""
    problems = _problems(source, **kw)
    assert len(problems) == 1, problems
    for f in fragments:
        assert f in problems[0], (f, problems[0])
    return problems[0]


# -- evaluating one setting -------------------------------------------------------------------

def test_gradients_by_hand():
    assert evaluate_setting([0, 1], "x", 0.25) == pytest.approx(0.25)
    # [1, 0.7, 0.1] at t = 0.75: position 1.5, halfway between 0.7 and 0.1 -> 0.4
    assert evaluate_setting([1, 0.7, 0.1], "x", 0.75) == pytest.approx(0.4)
    assert evaluate_setting([1, 0.7, 0.1], "x", 1.0) == 0.1
    assert evaluate_setting([0.3], "x", 0.6) == 0.3
    # Non-numeric lists pick values[int(t * (n - 1))], never interpolate.
    assert evaluate_setting([True, False], "x", 0.99) is True
    assert evaluate_setting([True, False], "x", 1.0) is False
    assert evaluate_setting(["a", "b", "c"], "x", 0.6) == "b"


def test_values_are_converted_to_the_parameter_type_before_interpolating():
    to_float = TypeAdapter(float).validate_python
    assert evaluate_setting(["1e-3", "3e-3"], "x", 0.5, to_float) == pytest.approx(2e-3)
    assert evaluate_setting(["1e-3", "3e-3"], "x", 0.5) == "1e-3"  # as text they are labels
    to_bool = TypeAdapter(bool).validate_python
    assert evaluate_setting([0, 1], "x", 0.6, to_bool) is False  # booleans pick: int(0.6) = 0


def test_filters_first_match_wins_and_are_substrings():
    setting = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0, 1]}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.3
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, "model.norm.weight", 0.5) == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0) is None
    assert evaluate_setting({"filter": "*", "value": 2}, "anything", 0) == 2
    # The MergeKit gotcha: "layers.1" also matches "layers.10"; a trailing dot avoids it.
    assert evaluate_setting([{"filter": "layers.1", "value": 1.0}], "model.layers.10.mlp", 0) == 1.0
    assert evaluate_setting([{"filter": "layers.1.", "value": 1.0}], "model.layers.10.mlp", 0) is None


@FAST
@given(values=st.lists(st.floats(-10, 10), min_size=1, max_size=6), t=st.floats(0, 1))
def test_numeric_gradient_is_numpy_interp_on_even_points(values, t):
    expected = np.interp(t, np.linspace(0, 1, len(values)), values)
    assert evaluate_setting(values, "x", t) == pytest.approx(expected, abs=1e-9)


_scalar = st.one_of(st.floats(0, 1), st.integers(0, 5), st.booleans(), st.sampled_from(["x", "y"]))
_value = st.one_of(_scalar, st.lists(st.floats(0, 1), min_size=1, max_size=4), st.lists(st.booleans(), min_size=1))
_cond = st.fixed_dictionaries({"value": _value}, optional={"filter": st.sampled_from(["mlp", "attn", "layers.1", "*"])})


@FAST
@given(setting=st.one_of(_value, _cond, st.lists(_cond, min_size=1, max_size=3)),
       name=st.sampled_from(["model.layers.1.mlp.w", "model.layers.10.self_attn.q", "lm_head.weight"]),
       t=st.floats(0, 1))
def test_evaluate_setting_agrees_with_mergekit(setting, name, t):
    mk = pytest.importorskip("mergekit.config")
    parsed = TypeAdapter(mk.ParameterSetting).validate_python(setting)
    assert evaluate_setting(setting, name, t) == mk.evaluate_setting(name, parsed, t, validate=lambda v: v)


# -- resolving a tensor's parameters ------------------------------------------------------------

def test_levels_override_in_order_and_unmatched_filters_fall_through(toy, dirs):
    r = load_recipe(_ties(dirs, parameters={"density": 0.9, "normalize": False, "weight": 2.0}))
    a, b = os.path.abspath(dirs["a"]), os.path.abspath(dirs["b"])
    assert r.parameters_for("model.layers.0.mlp.w", 0.0, a) == {"density": 0.5, "normalize": False, "weight": 0.5}
    assert r.parameters_for("model.layers.3.mlp.w", 0.75, b)["density"] == pytest.approx(0.4)
    assert r.parameters_for("x", 0.0, None) == {"density": 0.9, "normalize": False, "weight": 2.0}
    d = _ties(dirs, parameters={"density": 0.9})
    d["models"][0]["parameters"]["density"] = [{"filter": "mlp", "value": 0.2}]
    r = load_recipe(d)
    assert r.parameters_for("model.layers.0.mlp.w", 0.0, a)["density"] == 0.2
    assert r.parameters_for("model.layers.0.self_attn.w", 0.0, a)["density"] == 0.9  # the global one


def test_slice_level_and_alias_and_type_conversion(toy, dirs):
    d = {"merge_method": "_test_ties", "parameters": {"lambda": 0.5, "normalize": [0, 1]},
         "slices": [{"base_model": dirs["base"], "parameters": {"density": [0.2, 0.6], "lambda": 0.7},
                     "sources": [{"model": dirs["base"], "layer_range": [0, 4]},
                                 {"model": dirs["a"], "layer_range": [2, 6], "parameters": {"weight": 1}}]}]}
    r = load_recipe(d)
    sl = r.output_slices()[0]
    a = sl.sources[1].model
    got = r.parameters_for("model.layers.1.mlp.w", 0.5, a, sl)
    # slice lambda overrides the global; density interpolated: 0.2 + 0.5 * 0.4 = 0.4; normalize picks 0 -> False
    assert got == {"lambda": 0.7, "normalize": False, "density": pytest.approx(0.4), "weight": 1.0}
    assert isinstance(got["weight"], float) and r.parameters_for("x", 1.0, None, sl)["normalize"] is True


def test_resolution_agrees_with_mergekit(toy, dirs):
    mk_config = pytest.importorskip("mergekit.config")
    from mergekit.common import ModelReference
    from mergekit.merge_methods.base import ParameterScope, ParameterSpec
    from mergekit.parameter_resolver import resolve_parameter

    d = {"merge_method": "_test_ties", "parameters": {"weight": [1, 0], "density": 0.9},
         "slices": [{"parameters": {"density": [{"filter": "self_attn", "value": [0.1, 0.3]}], "weight": 3},
                     "base_model": dirs["base"],
                     "sources": [{"model": dirs["base"], "layer_range": [0, 3]},
                                 {"model": dirs["a"], "layer_range": [0, 3],
                                  "parameters": {"weight": [{"filter": "mlp", "value": 0.25}]}}]}]}
    r = load_recipe(d)
    sl = r.output_slices()[0]
    conf = mk_config.MergeConfiguration.model_validate(d)
    reader = mk_config.ConfigReader(config=conf, t=0, slice_out=conf.slices[0])
    ref_a = ModelReference.model_validate(dirs["a"])
    for pname in ("weight", "density"):
        spec = ParameterSpec(pname, Optional[float], ParameterScope.NON_BASE, default=None)
        for name in ("model.layers.1.mlp.w", "model.layers.1.self_attn.w", "model.norm.weight"):
            for t in (0.0, 0.5, 1.0):
                expected = resolve_parameter(spec, reader.parameter_sources(ref_a), tensor_name=name, t=t)
                assert r.parameters_for(name, t, sl.sources[1].model, sl).get(pname) == pytest.approx(expected)


# -- reading recipes ------------------------------------------------------------------------------

def test_yaml_text_file_and_dict_give_the_same_recipe(toy, dirs, tmp_path, monkeypatch):
    d = _ties({k: os.path.basename(v) for k, v in dirs.items()})  # relative paths
    f = tmp_path / "r.yml"
    f.write_text(yaml.safe_dump(d))
    monkeypatch.chdir(tmp_path)
    recipes = [load_recipe(d), load_recipe(yaml.safe_dump(d)), load_recipe(f), load_recipe(str(f))]
    assert all(r.model_dump() == recipes[0].model_dump() for r in recipes)
    assert all(r.output_slices() == recipes[0].output_slices() for r in recipes)
    assert all(yaml.safe_load(r.to_yaml()) == d for r in recipes)
    assert recipes[2].source_name == "r.yml" and recipes[0].source_name == "<recipe>"
    assert recipes[0].input_paths() == [str(tmp_path / n) for n in ("base", "a", "b")]


def test_relative_paths_try_the_current_folder_then_the_recipes(toy, dirs, tmp_path, monkeypatch):
    f = tmp_path / "r.yml"
    f.write_text(yaml.safe_dump(_ties({k: os.path.basename(v) for k, v in dirs.items()})))
    (tmp_path / "elsewhere" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_recipe(f).input_paths() == [str(tmp_path / "base"), str(tmp_path / "elsewhere" / "a"),
                                            str(tmp_path / "b")]
    with pytest.raises(RecipeError, match="'base' does not exist"):
        load_recipe(f.read_text())  # YAML text has no folder of its own


def test_errors_name_the_recipe_file(toy, dirs, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_ties(dirs, dtype="float7")))
    with pytest.raises(RecipeError, match=r"^bad.yaml: dtype: unknown dtype 'float7'"):
        load_recipe(f)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe("merge_method: [unclosed\n")


# -- field errors -----------------------------------------------------------------------------------

def test_unknown_parameter_suggests_and_lists_the_parameters(toy, dirs):
    d = _ties(dirs)
    d["models"][1]["parameters"] = {"weight": 0.5, "densty": 0.5}
    _one(d, "models[1].parameters.densty is not a parameter of _test_ties", "(did you mean 'density'?)",
         "Parameters of _test_ties: weight, density, normalize, lambda.")


def test_unknown_method_field_and_condition_key_suggest(toy, dirs):
    _one(_ties(dirs, merge_method="_test_tiez"), "merge_method: unknown method '_test_tiez'",
         "did you mean '_test_ties'")
    _one(_ties(dirs, base_modle="x"), "base_modle is not a recipe field", "did you mean 'base_model'")
    d = _ties(dirs)
    d["models"][0]["paramters"] = d["models"][0].pop("parameters")
    assert any("models[0].paramters" in p and "did you mean 'parameters'" in p for p in _problems(d))
    _one(_ties(dirs, parameters={"lambda": [{"fliter": "mlp", "value": 1}]}),
         "parameters.lambda[0].fliter is not a condition key", "did you mean 'filter'")


def test_schema_mistakes_explained(toy, dirs):
    d = _ties(dirs, density=0.5)
    d["models"][0]["weight"] = 1.0
    problems = _problems(d)
    assert "models[0].weight: method parameters such as weight go under `parameters:`" in problems[0]
    assert "density: method parameters such as density go under `parameters:`" in problems[1]
    _one({"merge_method": "_test_linear", "models": ["a"]}, "models[0]: 'a' is not a model entry; write `- model: a`")
    # what pruning cannot fix is reported once, with what it could
    assert _problems({"models": [], "colour": 1}) == [
        "merge_method is missing; add `merge_method: NAME` (`mergelab methods` lists them)",
        "colour is not a recipe field. Fields here: merge_method, base_model, models, slices, parameters, dtype, "
        "out_dtype, tokenizer_source, tokenizer, chat_template, name, vocab_mismatch, seed, base_stats, adapter, align."]


def test_every_problem_is_reported_at_once(toy, dirs):
    d = _ties(dirs, colour="red", parameters={"normalize": "maybe"})
    d["models"][0]["parameters"]["density"] = 1.5
    d["models"][1]["parameters"]["lambda"] = 2.0
    d["models"].append({"model": dirs["a"] + "-missing", "parameters": {"weight": 1}})
    problems = _problems(d)
    assert len(problems) == 5, problems
    expected = ["colour is not a recipe field", "parameters.normalize: 'maybe' is not valid; normalize must be true or false",
                "models[0].parameters.density: 1.5 is not valid; density must be a number with 0 < density <= 1",
                "models[1].parameters.lambda: lambda is a shared parameter", "models[2].model: '"]
    assert all(any(e in p for p in problems) for e in expected), problems
    with pytest.raises(RecipeError, match="5 problems"):
        load_recipe(d)


def test_values_checked_at_every_gradient_endpoint_and_condition(toy, dirs):
    d = _ties(dirs)
    d["models"][1]["parameters"]["density"] = [1.0, 0.0]
    _one(d, "models[1].parameters.density[1]: 0.0 is not valid; density must be a number with 0 < density <= 1")
    d = {"merge_method": "_test_slerp", "base_model": dirs["base"], "models": [{"model": dirs["a"]}],
         "parameters": {"t": [{"filter": "mlp", "value": [0, 1.2]}, {"value": 0.5}]}}
    _one(d, "parameters.t[0].value[1]: 1.2 is not valid; t must be a number with 0 <= t <= 1")
    d = _ties(dirs)
    d["models"][0]["parameters"]["weight"] = "heavy"
    _one(d, "models[0].parameters.weight: 'heavy' is not valid; weight must be a number")


def test_malformed_settings(toy, dirs):
    cases = [(None, "parameters.lambda has no value"), ([], "parameters.lambda is an empty list"),
             ([1, {"value": 2}], "parameters.lambda mixes plain values"),
             ([{"filter": "mlp"}], "parameters.lambda[0] has no `value`"),
             ({"value": [[1]]}, "parameters.lambda.value: [[1]] must be a value or a gradient"),
             ([{"filter": 3, "value": 1}], "parameters.lambda[0].filter: 3 must be text")]
    for setting, hint in cases:
        _one(_ties(dirs, parameters={"lambda": setting}), hint)
    _one({"merge_method": "_test_iter", "models": [{"model": dirs["a"]}], "parameters": {"max_iter": [1, 5]}},
         "parameters.max_iter: max_iter takes whole numbers")


def test_scope_and_required_parameters(toy, dirs):
    d = _ties(dirs)
    d["models"][0]["parameters"]["normalize"] = False
    _one(d, "models[0].parameters.normalize: normalize is a shared parameter of _test_ties", "top-level")
    d = _ties(dirs)
    del d["models"][0]["parameters"]["weight"]
    _one(d, "models[0].parameters.weight is missing", f"('{dirs['a']}')", "top-level `parameters:`")
    d["parameters"] = {"weight": 1.0}  # a per-model parameter set globally is every model's default
    assert load_recipe(d).parameters_for("x", 0, os.path.abspath(dirs["a"]))["weight"] == 1.0
    d = _ties(dirs)
    d["models"].insert(0, {"model": dirs["base"]})  # the base takes no per-model parameters
    load_recipe(d)


def test_method_inputs(toy, dirs):
    d = _ties(dirs)
    del d["base_model"]
    _one(d, "base_model: _test_ties needs a base model")
    slerp = {"merge_method": "_test_slerp", "base_model": dirs["base"], "parameters": {"t": 0.5},
             "models": [{"model": dirs["a"]}, {"model": dirs["b"]}]}
    _one(slerp, "models: _test_slerp merges exactly 1 model(s) besides the base model; the recipe gives 2")
    _one({"merge_method": "_test_linear"}, "models: no models to merge")
    lin = {"merge_method": "_test_linear", "base_model": dirs["base"],
           "models": [{"model": dirs["a"], "parameters": {"weight": 1}}]}
    # As MergeKit: the base becomes one more model, whose weight can only come from the top level.
    _one(lin, "base_model: _test_linear uses no base model, so", "merged as one more model", "needs a weight")
    with_top = {**lin, "parameters": {"weight": 0.5}}
    assert [s.model for s in load_recipe(with_top).output_slices()[0].sources] == [dirs["a"], dirs["base"]]
    lin["models"].append({"model": dirs["base"], "parameters": {"weight": 1}})
    assert [s.model for s in load_recipe(lin).output_slices()[0].sources] == [dirs["a"], dirs["base"]]
    lin["models"].append({"model": dirs["a"], "parameters": {"weight": 1}})
    _one(lin, "models[2].model:", "is already models[0]")


def test_stats_required_only_by_methods_that_use_them(toy, dirs):
    _one({"merge_method": "_test_stats", "models": [{"model": dirs["a"]}]}, "models[0].stats is missing")
    r = load_recipe({"merge_method": "_test_stats", "models": [{"model": dirs["a"], "stats": dirs["b"]}]})
    assert r.output_slices()[0].sources[0].stats == dirs["b"]
    d = _ties(dirs)
    d["models"][0]["stats"] = dirs["c"]
    _one(d, "models[0].stats: _test_ties uses no statistics")


# -- structure ----------------------------------------------------------------------------------------

def test_models_normalise_to_one_slice_with_the_base_appended(toy, dirs):
    r = load_recipe(_ties(dirs, tokenizer_source=dirs["c"]))
    (sl,) = r.output_slices()
    assert sl == OutputSlice([Source(dirs["a"], None, {"weight": 0.5, "density": 0.5}),
                              Source(dirs["b"], None, {"weight": 0.5, "density": [1.0, 0.7, 0.1]}),
                              Source(dirs["base"], None, {})], {}, None)
    assert r.input_paths() == [dirs["base"], dirs["a"], dirs["b"], dirs["c"]]
    assert r.tokenizer_source_path() == dirs["c"]
    d = _ties(dirs)
    d["models"].insert(1, {"model": dirs["base"]})
    assert [s.model for s in load_recipe(d).output_slices()[0].sources] == [dirs["a"], dirs["base"], dirs["b"]]


def test_slices_normalised_and_checked(toy, dirs):
    d = {"merge_method": "_test_linear", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": dirs["a"], "layer_range": [0, 4]}], "parameters": {"weight": 2.0}},
        {"sources": [{"model": dirs["b"], "layer_range": [2, 6]}], "residual_weight": 0.5}]}
    r = load_recipe(d)
    assert r.output_slices() == [OutputSlice([Source(dirs["a"], (0, 4), {})], {"weight": 2.0}, None),
                                 OutputSlice([Source(dirs["b"], (2, 6), {})], {}, None)]
    bad = yaml.safe_load(yaml.safe_dump(d))
    bad["slices"][1]["sources"][0]["layer_range"] = [5, 3]
    bad["slices"][0]["sources"].append({"model": dirs["c"], "layer_range": [0, 2]})
    problems = _problems(bad)
    assert any("slices[1].sources[0].layer_range: [5, 3] is not a layer range" in p for p in problems)
    assert any("slices[0]: its sources span [4, 2] layers" in p for p in problems)
    _one({**d, "models": [{"model": dirs["a"]}]}, "models and slices are both given")
    ties = {"merge_method": "_test_ties", "base_model": dirs["base"],
            "slices": [{"sources": [{"model": dirs["a"], "layer_range": [0, 2], "parameters": {"weight": 1}}]}]}
    _one(ties, "slices[0]: its base model", "is not among its sources")


def test_tokenizer_and_modules_and_dtypes(toy, dirs):
    # union and tokens: are supported (tests/tokenizer); the union's tokenizer starts from the base's files
    assert load_recipe(_ties(dirs, tokenizer_source="union")).tokenizer_source_path() == dirs["base"]
    assert load_recipe(_ties(dirs, tokenizer={})).tokenizer.source == "union"
    _one(_ties(dirs, tokenizer={"source": "base", "tokens": {"<x>": {"force": True}}}), "needs a `source`")
    _one(_ties(dirs, tokenizer={"source": "base"}, tokenizer_source="base"), "both given")
    assert load_recipe(_ties(dirs, tokenizer={"source": "base"})).tokenizer_source_path() == dirs["base"]
    _one({"merge_method": "_test_linear", "modules": {"default": {"models": []}}},
         "modules.default: a module holds either `models:` or `slices:`")  # more: tests/test_recipe_forms.py
    _one({"merge_method": "_test_linear", "modules": {"text": {"models": []}, "vision": {"models": []}}},
         "modules: this recipe merges the modules text, vision of a multi-module model")
    r = load_recipe(_ties(dirs, dtype="bfloat16", seed=3, vocab_mismatch="resize", name="x", chat_template="chatml"))
    assert (r.compute_dtype, r.out_dtype, r.seed, r.vocab_mismatch) == (torch.float32, torch.bfloat16, 3, "resize")
    r = load_recipe(_ties(dirs, dtype="float64", out_dtype="float16"))
    assert (r.compute_dtype, r.out_dtype) == (torch.float64, torch.float16)
    assert load_recipe(_ties(dirs)).out_dtype is None
    _one(_ties(dirs, vocab_mismatch="pad"), "vocab_mismatch: 'pad' is not valid; use `error` or `resize`")


def test_model_references(toy, dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # Hub ids: tests/test_hub.py
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = _ties(dirs)
    d["models"][0]["model"] = "meta-llama/Llama-3-8B"
    d["base_model"] = "org/model@main"
    with pytest.raises(RecipeError) as err:  # Hub ids are found by resolve, the stage before planning
        resolve(load_recipe(d))
    problems = err.value.problems
    assert any(p.startswith("models[0].model: 'meta-llama/Llama-3-8B' is no local path, and as a Hub model it is "
                            "not in the local cache") and
               "offline" in p for p in problems)
    assert any(p.startswith("base_model: 'org/model@main' is no local path, and as a Hub model it is not in the "
                            "local cache") for p in problems)
    d = _ties(dirs)
    d["models"][1]["model"] = dirs["a"] + "+" + dirs["b"]
    problems = _problems(d)
    assert any(p.startswith("models[1].model:") and "after '+' is not a PEFT adapter folder" in p
               for p in problems)  # model+lora needs an adapter after the '+' (tests/lora test the rest)
    d = _ties(dirs)
    d["models"][0]["model"] = "./nowhere"
    _one(d, "models[0].model: './nowhere' does not exist", "recipe's folder")
    load_recipe(d, check_paths=False)
    d["models"][0]["model"] = "x+y"
    _one(d, "model+lora", check_paths=False)


# -- real MergeKit recipes ---------------------------------------------------------------------------

MERGEKIT_EXAMPLES = {
    "ties": """
models:
  - model: {a}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {b}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {c}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "slerp": """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 40]
      - model: {b}
        layer_range: [0, 40]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: bfloat16
""",
    "passthrough": """
slices:
  - sources:
    - model: {a}
      layer_range: [0, 16]
  - sources:
    - model: {b}
      layer_range: [8, 24]
  - sources:
    - model: {a}
      layer_range: [17, 32]
merge_method: passthrough
dtype: float16
""",
    "dare_ties": """
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {a}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 0.5
  - model: {b}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: dare_ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.5}}
parameters: {{lambda: 0.8}}
tokenizer_source: base
dtype: float32
""",
    "linear": """
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 0.5}}
merge_method: linear
parameters: {{normalize: true}}
tokenizer: {{source: {b}}}
""",
}


@pytest.mark.parametrize("method", sorted(MERGEKIT_EXAMPLES))
def test_mergekit_example_recipes_load_unchanged(method, dirs):
    _real(method)
    text = MERGEKIT_EXAMPLES[method].format(**dirs)
    r = load_recipe(text)
    assert r.method.name == method and r.to_yaml()
    mk_config = pytest.importorskip("mergekit.config")
    mk_config.MergeConfiguration.model_validate(yaml.safe_load(text))  # MergeKit accepts it as well


def test_real_method_parameter_names(dirs):
    _real("ties", "slerp", "linear", "passthrough")
    d = yaml.safe_load(MERGEKIT_EXAMPLES["ties"].format(**dirs))
    d["models"][0]["parameters"]["densty"] = 0.5
    msg = _one(d, "models[0].parameters.densty is not a parameter of ties (did you mean 'density'?)")
    assert all(n in msg for n in ("weight", "density", "normalize", "int8_mask", "lambda"))
    slerp = {"merge_method": "slerp", "base_model": dirs["a"], "parameters": {"t": 0.5},
             "models": [{"model": dirs["a"]}, {"model": dirs["b"]}, {"model": dirs["c"]}]}
    _one(slerp, "slerp merges exactly 1 model(s) besides the base model; the recipe gives 2")
    _one({"merge_method": "linear", "models": [{"model": dirs["a"]}]}, "models[0].parameters.weight is missing")
    pt = {"merge_method": "passthrough", "models": [{"model": dirs["a"], "parameters": {"scale": 0.5}}]}
    assert load_recipe(pt).parameters_for("x", 0, dirs["a"]) == {"scale": 0.5}
