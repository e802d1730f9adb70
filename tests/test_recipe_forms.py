"""Recipe forms MergeKit accepts: parameters a method ignores, base_model with base-free methods,
`modules: {default: ...}`, and MergeKit methods mergelab lacks, named as such.

Numbers are checked against mergekit 0.1.5's output on the same recipe (tests marked `mergekit`,
skipped without it) or against the same merge written without the ignored settings.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mergelab
from mergelab.errors import RecipeError
from mergelab.methods import REGISTRY
from mergelab.mergekit_names import MERGEKIT_METHODS
from mergelab.recipe import load_recipe


def _load(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe(text)
    return err.value.problems


def _slerp(p, extra_a="", extra_b="", top="t: 0.3") -> str:
    return (f"merge_method: slerp\nbase_model: {p['a']}\nparameters: {{{top}}}\nmodels:\n"
            f"  - model: {p['a']}\n" + (f"    parameters: {{{extra_a}}}\n" if extra_a else "")
            + f"  - model: {p['b']}\n" + (f"    parameters: {{{extra_b}}}\n" if extra_b else "") + "dtype: float32\n")


# -- parameters a method does not use -------------------------------------------------------------


def test_weight_on_slerp_is_ignored_listed_and_changes_nothing(llama_family, tmp_path):
    p = llama_family
    with_weights = _slerp(p, "weight: 0.3", "weight: [{filter: mlp, value: 0.1}, {value: 0.9}]")
    rec = load_recipe(with_weights)
    notes = rec.ignored_parameters()
    assert notes == ["models[0].parameters.weight: slerp has no parameter weight; ignored (as MergeKit does)",
                     "models[1].parameters.weight: slerp has no parameter weight; ignored (as MergeKit does)"]
    mergelab.merge(with_weights, tmp_path / "w")
    mergelab.merge(_slerp(p), tmp_path / "plain")
    got, plain = _load(tmp_path / "w"), _load(tmp_path / "plain")
    assert set(got) == set(plain)
    for k in plain:
        assert torch.equal(got[k], plain[k]), k
    report = json.loads((tmp_path / "w" / "mergelab_report.json").read_text())
    assert report["ignored_parameters"] == notes
    assert json.loads((tmp_path / "plain" / "mergelab_report.json").read_text())["ignored_parameters"] == []


@pytest.mark.parametrize("method, base", [("sce", True), ("model_stock", True), ("nearswap", True),
                                          ("karcher", False)])
def test_weight_is_accepted_and_listed_for_methods_without_it(method, base, llama_family):
    p = llama_family
    models = ["a"] if method == "nearswap" else ["a", "b", "c"]
    text = (f"merge_method: {method}\n" + (f"base_model: {p['base']}\n" if base else "")
            + ("parameters: {t: 0.001}\n" if method == "nearswap" else "") + "models:\n"
            + "".join(f"  - model: {p[m]}\n    parameters: {{weight: 0.5}}\n" for m in models))
    notes = load_recipe(text).ignored_parameters()
    assert len(notes) == len(models) and all(f"{method} has no parameter weight" in n for n in notes), notes


def test_a_per_model_parameter_on_the_base_of_ties_is_listed_as_ignored(llama_family):
    p = llama_family
    text = (f"merge_method: ties\nbase_model: {p['base']}\nmodels:\n  - model: {p['base']}\n"
            f"    parameters: {{weight: 0.4, density: 0.5}}\n"
            f"  - model: {p['a']}\n    parameters: {{weight: 1, density: 0.5}}\n")
    notes = load_recipe(text).ignored_parameters()
    assert notes == [f"models[0].parameters.{k}: the base model of ties takes no per-model parameters; ignored "
                     "(as MergeKit does)" for k in ("weight", "density")]


def test_a_name_that_is_no_methods_parameter_stays_an_error(llama_family):
    p = llama_family
    problems = _problems(f"merge_method: ties\nbase_model: {p['base']}\nmodels:\n  - model: {p['a']}\n"
                         "    parameters: {weight: 1, densty: 0.5}\n")
    assert len(problems) == 1, problems
    assert problems[0].startswith("models[0].parameters.densty is not a parameter of ties (did you mean 'density'?)")
    problems = _problems(_slerp(p, "wieght: 0.3"))
    assert len(problems) == 1 and "wieght is not a parameter of slerp" in problems[0]


def test_an_ignored_setting_must_still_be_well_formed(llama_family):
    problems = _problems(_slerp(llama_family, "weight: [{filter: mlp}]"))
    assert len(problems) == 1 and "models[0].parameters.weight[0] has no `value`" in problems[0], problems


def test_cli_summary_lists_ignored_parameters(llama_family, tmp_path):
    from typer.testing import CliRunner

    from mergelab.cli.main import app

    recipe = tmp_path / "r.yml"
    recipe.write_text(_slerp(llama_family, "weight: 0.3"))
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "ignored: models[0].parameters.weight: slerp has no parameter weight" in result.output
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "dry"), "--dry-run"])
    assert "ignored: models[0].parameters.weight: slerp has no parameter weight" in result.output


# -- base_model with base-free methods ------------------------------------------------------------


def test_base_model_with_linear_is_one_more_model_weighted_by_the_top_level(llama_family, tmp_path):
    p = llama_family
    text = (f"merge_method: linear\nbase_model: {p['base']}\nparameters: {{weight: 0.5}}\nmodels:\n"
            f"  - model: {p['a']}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {p['b']}\n    parameters: {{weight: 0.9}}\n")
    mergelab.merge(text, tmp_path / "out")
    got = _load(tmp_path / "out")
    a, b, base = (_load(p[k]) for k in ("a", "b", "base"))
    for k in got:  # the weighted mean written out: (0.3 a + 0.9 b + 0.5 base) / 1.7
        torch.testing.assert_close(got[k], (0.3 * a[k] + 0.9 * b[k] + 0.5 * base[k]) / 1.7, rtol=1e-5, atol=1e-6)


def test_base_model_with_linear_and_no_top_level_weight_says_what_to_add(llama_family):
    p = llama_family
    problems = _problems(f"merge_method: linear\nbase_model: {p['base']}\nmodels:\n  - model: {p['a']}\n"
                         "    parameters: {weight: 0.3}\n")
    assert len(problems) == 1 and "merged as one more model (as MergeKit does) and needs a weight" in problems[0]


# -- modules ---------------------------------------------------------------------------------------


def _modules_linear(p) -> str:
    return (f"merge_method: linear\nparameters:\n  weight: 0.5\nmodules:\n  default:\n"
            "    parameters:\n      weight: [{filter: mlp, value: 0.2}]\n    models:\n"
            f"      - model: {p['a']}\n      - model: {p['b']}\n"
            "        parameters: {weight: [{filter: self_attn, value: 3.0}]}\n"
            "dtype: float32\n")


def test_modules_default_is_the_top_level_models_with_module_parameters_in_between(llama_family, tmp_path):
    p = llama_family
    mergelab.merge(_modules_linear(p), tmp_path / "out")
    got = _load(tmp_path / "out")
    a, b = _load(p["a"]), _load(p["b"])
    for k in got:
        # precedence model > module > top level, each falling back when its filters do not match
        wa = 0.2 if "mlp" in k else 0.5
        wb = 3.0 if "self_attn" in k else wa
        torch.testing.assert_close(got[k], (wa * a[k] + wb * b[k]) / (wa + wb), rtol=1e-5, atol=1e-6, msg=k)


def test_multi_module_recipes_are_refused_with_the_reason(llama_family):
    p = llama_family
    text = (f"merge_method: linear\nmodules:\n  text_decoder:\n    models:\n      - model: {p['a']}\n"
            f"  vision_tower:\n    models:\n      - model: {p['b']}\n")
    problems = _problems(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith("modules: this recipe merges the modules text_decoder, vision_tower of a "
                                  "multi-module model")
    assert "Merge it with mergekit" in problems[0]
    both = (f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: {p['a']}\n"
            f"modules:\n  default:\n    models:\n      - model: {p['a']}\n")
    assert _problems(both) == ["modules is given with top-level `models:`/`slices:`; give exactly one of models, "
                               "slices or modules (as MergeKit requires)"]
    empty = "merge_method: linear\nmodules:\n  default:\n    parameters: {weight: 1}\n"
    assert _problems(empty) == ["modules.default: a module holds either `models:` or `slices:` (and optionally "
                                "`parameters:`); it has parameters"]


# -- MergeKit methods mergelab lacks ---------------------------------------------------------------


def test_a_mergekit_method_mergelab_lacks_is_named_as_such(llama_family, monkeypatch):
    monkeypatch.delitem(REGISTRY, "karcher")  # stands for any MergeKit method not (yet) in mergelab
    p = llama_family
    problems = _problems(f"merge_method: karcher\nmodels:\n  - model: {p['a']}\n  - model: {p['b']}\n")
    assert problems == ["merge_method: MergeKit's karcher is not implemented in mergelab; choose another method "
                        "(`mergelab methods` lists them) or run this recipe with mergekit"]
    problems = _problems(f"merge_method: karcherr\nmodels:\n  - model: {p['a']}\n")
    assert problems[0].startswith("merge_method: unknown method 'karcherr'")
    from mergelab.methods import get_method

    with pytest.raises(KeyError, match="MergeKit's karcher is not implemented in mergelab"):
        get_method("karcher")


def test_mergekit_method_table_matches_mergekit_0_1_5():
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.registry import registered_methods

    theirs = {m.spec.name: tuple(p.name for p in m.spec.parameters) for m in registered_methods()}
    assert {k: set(v) for k, v in theirs.items()} == {k: set(v) for k, v in MERGEKIT_METHODS.items()}


# -- parity with mergekit 0.1.5 --------------------------------------------------------------------

# slerp with ignored weights is the slerp of tests/test_mergekit_parity.py (test_weight_on_slerp_... above)
PARITY = {
    "linear_base_extra": "merge_method: linear\nbase_model: {base}\nparameters: {{weight: 0.5}}\nmodels:\n"
    "  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.9}}\n",
    "karcher_base_extra": "merge_method: karcher\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n",
    # three models, as tests/test_mergekit_parity.py's sce (with two, sce differs from MergeKit's by ~5e-5
    # with or without weights: a matter of the method, not of the ignored weights)
    "sce_with_weights": "merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.5}}\nmodels:\n"
    "  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.9}}\n"
    "  - model: {c}\n    parameters: {{weight: 2.0}}\n",
    "modules_default": "merge_method: linear\nparameters:\n  weight: 0.5\nmodules:\n  default:\n"
    "    parameters:\n      weight: [{{filter: mlp, value: 0.2}}]\n    models:\n      - model: {a}\n"
    "      - model: {b}\n        parameters: {{weight: [{{filter: self_attn, value: 3.0}}]}}\n",
}


@pytest.mark.mergekit
@pytest.mark.parametrize("name", sorted(PARITY))
def test_same_tensors_as_mergekit(name, llama_family, tmp_path):
    pytest.importorskip("mergekit")
    from test_mergekit_parity import _load as load, _render, _run_mergekit

    text = _render(PARITY[name], llama_family)
    expected = _run_mergekit(text, tmp_path / "mergekit")
    mergelab.merge(text, tmp_path / "mergelab", seed=0)
    got = load(tmp_path / "mergelab")
    assert set(got) == set(expected), set(got) ^ set(expected)
    for key in sorted(expected):
        torch.testing.assert_close(got[key], expected[key], rtol=2e-5, atol=2e-6, msg=lambda m: f"{name} {key}: {m}")
