"""The `mergelab` command: merge, dry run, methods, inspect, and errors as messages (exit 2), not tracebacks."""

from __future__ import annotations

import json

import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergelab.cli.main import app


def _recipe(tmp_path, paths, **extra):
    d = {"merge_method": "ties", "base_model": str(paths["base"]),
         "models": [{"model": str(paths[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in "ab"]}
    d.update(extra)
    f = tmp_path / "recipe.yml"
    f.write_text(yaml.safe_dump(d))
    return f


def test_merge_writes_the_model_and_summarises(llama_family, tmp_path):
    result = CliRunner().invoke(app, ["merge", str(_recipe(tmp_path, llama_family)), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "merged" in result.output and "tensors" in result.output
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(llama_family["base"] / "model.safetensors"))
    assert set(got) == set(base)


def test_dry_run_prints_the_plan_and_writes_nothing(llama_family, tmp_path):
    result = CliRunner().invoke(app, ["merge", str(_recipe(tmp_path, llama_family)), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "plan: ties" in result.output and "read" in result.output and "MB" in result.output
    assert "densit" in result.output  # the resolved per-model parameters are shown (folded to the width)
    assert not (tmp_path / "out").exists()


def test_recipe_error_is_a_message_with_exit_code_2(llama_family, tmp_path):
    bad = _recipe(tmp_path, llama_family, parameters={"normalise": True})
    result = CliRunner().invoke(app, ["merge", str(bad), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "normalise" in result.output and "normalize" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_methods_lists_every_method_and_describes_one():
    import mergelab

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in mergelab.methods():
        assert name in result.output
    one = CliRunner().invoke(app, ["methods", "ties"])
    assert one.exit_code == 0 and "density" in one.output and "arXiv:2306.01708" in one.output
    unknown = CliRunner().invoke(app, ["methods", "tiez"])
    assert unknown.exit_code == 2 and "did you mean" in unknown.output


def test_inspect_writes_json_and_plot(llama_family, tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(llama_family["a"]), str(llama_family["b"]),
                                      "--base", str(llama_family["base"]), "--json", str(tmp_path / "r.json"),
                                      "--plot", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["recommendations"]
    assert (tmp_path / "r.png").stat().st_size > 1000
