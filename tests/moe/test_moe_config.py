"""Bad mergekit-moe configs: one line naming the field, exit code 2, before any work (nothing written)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from moe_kit import family, moe_config, write_config  # noqa: F401 (family: a fixture)
from mergelab.cli.main import app

pytest.importorskip("transformers", reason="mergelab moe needs transformers (pip install mergelab[hf])")


def _run(tmp_path, config: dict, *extra: str):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["moe", str(write_config(tmp_path, config)), str(out), "-q", *extra])
    return result, out


def _without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


def _bad_configs(family, tmp_path):
    good = moe_config(family)
    experts = good["experts"]
    return {
        "missing base": (_without(good, "base_model"), "base_model is missing"),
        "no experts": ({**good, "experts": []}, "experts: no experts"),
        "empty prompts": ({**good, "experts": [experts[0], {**experts[1], "positive_prompts": []}, experts[2]]},
                          "experts[1].positive_prompts is empty"),
        "typo gate mode": ({**good, "gate_mode": "hiden"}, "gate_mode: 'hiden' is not a gate mode (did you mean 'hidden'?)"),
        "typo field": ({**good, "experts_per_tokn": 2}, "experts_per_tokn is not a mergekit-moe field (did you mean "
                       "'experts_per_token'?)"),
        "too many per token": ({**good, "experts_per_token": 4}, "experts_per_token: 4 is more than the 3 experts"),
        "same prompts": ({**good, "experts": [{**e, "positive_prompts": ["two plus two"]} for e in experts]},
                         "every expert has the same positive and negative prompts"),
        "same model": ({**good, "experts": [{**e, "source_model": experts[0]["source_model"]} for e in experts]},
                       "every expert is"),
        "missing model": ({**good, "experts": [experts[0], {**experts[1], "source_model": str(tmp_path / "nope")}]},
                          "experts[1].source_model:"),
        "shared on mixtral": ({**good, "architecture": "mixtral", "shared_experts": [experts[0]]},
                              "shared_experts: Mixtral has no shared expert"),
        "qwen without shared": ({**good, "architecture": "qwen"}, "needs exactly one shared expert"),
        "deepseek": ({**good, "architecture": "deepseek"}, "DeepSeek MoE output is not implemented in mergelab"),
        "bad dtype": ({**good, "dtype": "float8"}, "dtype: unknown dtype 'float8'"),
    }


CASES = ["missing base", "no experts", "empty prompts", "typo gate mode", "typo field", "too many per token",
         "same prompts", "same model", "missing model", "shared on mixtral", "qwen without shared", "deepseek",
         "bad dtype"]


@pytest.mark.parametrize("case", CASES)
def test_bad_config_is_one_line_naming_the_field(case, family, tmp_path):
    config, expected = _bad_configs(family, tmp_path)[case]
    result, out = _run(tmp_path, config)
    assert result.exit_code == 2, result.output
    assert expected in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_random_gates_need_no_prompts_and_same_model_passes_with_mergekits_flag(family, tmp_path):
    good = moe_config(family)
    same = [{"source_model": good["experts"][0]["source_model"]}] * 2
    result, out = _run(tmp_path, {**good, "gate_mode": "random", "experts": same})
    assert result.exit_code == 2 and "every expert is" in result.output
    assert "allow_all_same=True" in result.output
    assert "(on the command line: --i-understand-this-is-not-useful-without-training)" in result.output
    result, out = _run(tmp_path, {**good, "gate_mode": "random", "experts": same},
                       "--i-understand-this-is-not-useful-without-training")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()


def test_experts_of_another_shape_or_architecture_are_refused(family, tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    from moe_kit import llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(intermediate_size=40)).save_pretrained(tmp_path / "narrow")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=60)).save_pretrained(tmp_path / "gpt2")
    good = moe_config(family)
    narrow = {**good, "experts": [*good["experts"][:2], {**good["experts"][2], "source_model": str(tmp_path / "narrow")}]}
    result, _ = _run(tmp_path, narrow)
    assert result.exit_code == 2
    assert "experts[2].source_model: intermediate_size is 40 but the base model's is 48" in result.output
    gpt2 = {**good, "experts": [*good["experts"][:2], {**good["experts"][2], "source_model": str(tmp_path / "gpt2")}]}
    result, _ = _run(tmp_path, gpt2)
    assert result.exit_code == 2
    assert "experts[2].source_model: model_type 'gpt2' is not supported for a Mixtral output" in result.output


def test_existing_output_needs_overwrite(family, tmp_path):
    config = moe_config(family, gate_mode="random")
    result, out = _run(tmp_path, config)
    assert result.exit_code == 0, result.output
    first = (out / "model.safetensors").read_bytes()
    result, _ = _run(tmp_path, config)
    assert result.exit_code == 2 and "--overwrite" in result.output
    result, _ = _run(tmp_path, config, "--overwrite", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").read_bytes() != first  # another seed, other random gates
    # a folder mergelab did not write is never replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["moe", str(write_config(tmp_path, config)), str(foreign), "-q", "--overwrite"])
    assert result.exit_code == 2 and (foreign / "notes.txt").read_text() == "mine"


def _flags():
    import torch

    return ["--load-in-4bit", "--load-in-8bit", "--gate-dtype=int3"] + ([] if torch.cuda.is_available() else ["--cuda"])


@pytest.mark.parametrize("flag", _flags())
def test_unsupported_flags_are_one_line(flag, family, tmp_path):
    result, out = _run(tmp_path, moe_config(family), flag)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert (flag.split("=")[0] if flag != "--cuda" else "cuda") in result.output and not out.exists()
