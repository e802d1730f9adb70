"""Fuzzing the command line with hypothesis: random recipes built from the schema with wrong types and
extreme numbers, and random shard sizes.

Property: the command succeeds, or exits 2 with one message; never a traceback or a hang, never a write
outside OUT_DIR, never a change to an input.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergelab.cli.main import app
from mergelab.methods import REGISTRY

FUZZ = settings(max_examples=60, deadline=10_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    models = []
    for i in range(3):
        folder = root / f"m{i}"
        folder.mkdir()
        save_file({"model.layers.0.w": torch.randn(4, 3) + i, "model.layers.1.w": torch.randn(4, 3),
                   "lm_head.weight": torch.randn(5, 3)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": 2}))
        models.append(str(folder))
    return root, models


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                    st.sampled_from([0, 1, -1, 0.5, 1e308, -1e-320, "nan", "inf", "1e400", "0.3"]))
scalars = st.one_of(numbers, st.booleans(), st.none(), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.sampled_from(["filter", "value", "x"]),
                                                                        inner, max_size=3)), max_leaves=8)
param_names = st.sampled_from(["weight", "density", "t", "lambda", "normalize", "epsilon", "gamma", "rescale",
                               "int8_mask", "select_topk", "k", "bogus"])
params = st.dictionaries(param_names, values, max_size=3)


@st.composite
def near_valid(draw, models):
    """A well-formed recipe whose numbers are drawn from everywhere (extremes, NaN, strings)."""
    method = draw(st.sampled_from(["linear", "task_arithmetic", "ties", "dare_linear", "slerp", "breadcrumbs"]))
    number = st.one_of(st.floats(-2, 2), st.floats(0, 1), numbers)
    sparse = method in ("ties", "dare_linear", "breadcrumbs")
    entries = [{"model": m, "parameters": {"weight": draw(number), **({"density": draw(number)} if sparse else {})}}
               for m in models[1:]]
    recipe = {"merge_method": method, "base_model": models[0], "models": entries}
    if method == "slerp":
        recipe["models"] = [{"model": models[1]}]
        recipe["parameters"] = {"t": draw(number)}
    elif method == "linear":
        recipe.pop("base_model")
        recipe["parameters"] = {"normalize": draw(st.booleans())}
    return recipe


@st.composite
def recipes(draw, models):
    if draw(st.booleans()):
        return draw(near_valid(models))
    method = draw(st.one_of(st.sampled_from(sorted(REGISTRY)), st.text(max_size=6), st.integers()))
    entries = draw(st.lists(st.one_of(
        st.builds(lambda m, p: {"model": m, "parameters": p}, st.sampled_from(models), params),
        st.sampled_from(models), values), max_size=3))
    recipe = {"merge_method": method, "models": entries}
    if draw(st.booleans()):
        recipe["base_model"] = draw(st.one_of(st.sampled_from(models), scalars))
    if draw(st.booleans()):
        recipe["parameters"] = draw(params)
    if draw(st.booleans()):
        recipe["slices"] = [{"sources": [{"model": draw(st.sampled_from(models)),
                                          "layer_range": draw(st.lists(st.integers(-3, 12), min_size=0, max_size=3))}]}]
    for key in draw(st.lists(st.sampled_from(["dtype", "out_dtype", "tokenizer_source", "chat_template", "seed"]),
                             max_size=2)):
        recipe[key] = draw(scalars)
    return recipe


def _no_traceback(result) -> None:
    assert result.exit_code in (0, 2), (result.exit_code, result.output, repr(result.exception))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def test_random_recipes_end_in_success_or_one_clear_error(world, tmp_path_factory):
    root, models = world
    inputs_before = snapshot(root)

    @FUZZ
    @given(data=st.data())
    def check(data):
        recipe = data.draw(recipes(models))
        work = tmp_path_factory.mktemp("run")
        text = yaml.safe_dump(recipe, allow_unicode=True) if data.draw(st.booleans()) else json.dumps(recipe)
        (work / "r.yml").write_text(text)
        result = CliRunner().invoke(app, ["merge", str(work / "r.yml"), str(work / "out"), "--quiet"])
        _no_traceback(result)
        written = {p.name for p in work.iterdir()}
        assert written <= {"r.yml", "out"}, written  # nothing outside OUT_DIR, no temporary left
        if result.exit_code == 2:
            assert "out" not in written
            assert result.output.startswith("error:"), result.output

    check()
    assert snapshot(root) == inputs_before


def test_random_shard_sizes(world, tmp_path_factory):
    root, models = world
    recipe = tmp_path_factory.mktemp("r") / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1}}
                                                                          for m in models[:2]]}))

    @settings(max_examples=40, deadline=10_000, derandomize=True, database=None)
    @given(st.one_of(st.text(max_size=10), st.from_regex(r"-?[0-9]{0,5}(\.[0-9]{0,3})?(e[+-]?[0-9]{1,4})?"
                                                          r"\s?(B|K|M|G|GB|MB|KiB|GiB|b|kb|tb|X)?", fullmatch=True)))
    def check(size):
        out = recipe.parent / "out"
        result = CliRunner().invoke(app, ["merge", str(recipe), str(out), "--quiet", "--overwrite",
                                          "--out-shard-size", size])
        _no_traceback(result)
        if result.exit_code == 0:
            assert (out / "mergelab_report.json").is_file()

    check()
