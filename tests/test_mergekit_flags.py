"""MergeKit's command-line flags on `mergelab merge` mean what they mean to mergekit-yaml."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab.cli.main import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _model(folder, value, arch="LlamaForCausalLM"):
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(int(value * 10))
    save_file({"model.layers.0.w": torch.randn(8, 4, generator=g) + value, "b": torch.full((4,), value)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], "num_hidden_layers": 1}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def _recipe(tmp_path, method, base, models, name="r.yml", **params):
    d = {"merge_method": method, "models": [{"model": str(m), "parameters": {"weight": 0.5, **params}}
                                            for m in models]}
    if base is not None:
        d["base_model"] = str(base)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return path


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.output.startswith("mergelab ")


def test_random_seed_is_seed_and_lazy_flags_are_accepted(tmp_path):
    base, a, b = _model(tmp_path / "base", 0.0), _model(tmp_path / "a", 1.0), _model(tmp_path / "b", 2.0)
    recipe = _recipe(tmp_path, "dare_ties", base, [a, b], density=0.5)
    assert run("merge", recipe, tmp_path / "o1", "--seed", 7, "--quiet").exit_code == 0
    r = run("merge", recipe, tmp_path / "o2", "--random-seed", 7, "--lazy-unpickle", "--low-cpu-memory",
            "--trust-remote-code", "--quiet")
    assert r.exit_code == 0, r.output
    assert run("merge", recipe, tmp_path / "o3", "--random-seed", 8, "--quiet").exit_code == 0
    first, again, other = (load_file(str(tmp_path / o / "model.safetensors")) for o in ("o1", "o2", "o3"))
    assert torch.equal(first["model.layers.0.w"], again["model.layers.0.w"])
    assert not torch.equal(first["model.layers.0.w"], other["model.layers.0.w"])


def test_copy_tokenizer_and_model_card_flags(tmp_path):
    a, b = _model(tmp_path / "a", 1.0), _model(tmp_path / "b", 2.0)
    recipe = _recipe(tmp_path, "linear", None, [a, b])
    assert run("merge", recipe, tmp_path / "with", "--quiet").exit_code == 0
    assert (tmp_path / "with" / "tokenizer.json").is_file() and (tmp_path / "with" / "README.md").is_file()
    r = run("merge", recipe, tmp_path / "without", "--no-copy-tokenizer", "--no-write-model-card", "--quiet")
    assert r.exit_code == 0, r.output
    names = {p.name for p in (tmp_path / "without").iterdir()}
    assert "config.json" in names and "tokenizer.json" not in names and "tokenizer_config.json" not in names
    assert "README.md" not in names and "mergelab_report.json" in names


def test_different_architectures_need_allow_crimes(tmp_path):
    a, b = _model(tmp_path / "a", 1.0), _model(tmp_path / "b", 2.0, arch="MistralForCausalLM")
    recipe = _recipe(tmp_path, "linear", None, [a, b])
    r = run("merge", recipe, tmp_path / "o", "--quiet")
    assert r.exit_code == 2 and "different architectures" in r.output and "--allow-crimes" in r.output
    assert not (tmp_path / "o").exists()
    assert run("merge", recipe, tmp_path / "o", "--allow-crimes", "--quiet").exit_code == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is there")
def test_cuda_flag_is_device_cuda(tmp_path):
    a, b = _model(tmp_path / "a", 1.0), _model(tmp_path / "b", 2.0)
    r = run("merge", _recipe(tmp_path, "linear", None, [a, b]), tmp_path / "o", "--cuda", "--quiet")
    assert r.exit_code == 2 and "no CUDA GPU" in r.output


def test_verbose_lists_what_was_handled_specially(tmp_path):
    a = _model(tmp_path / "a", 1.0)
    b = tmp_path / "b"
    b.mkdir()
    save_file({"model.layers.0.w": torch.zeros(8, 4)}, str(b / "model.safetensors"))  # no "b" tensor
    (b / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    r = run("merge", _recipe(tmp_path, "linear", None, [a, b]), tmp_path / "o", "-v", "--quiet")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "left out b of" in text and "merged without this model" in text  # each case, with its reason
