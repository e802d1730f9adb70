"""What the output folder holds: the chat template a recipe names, and the architecture's own config keys."""

from __future__ import annotations

import json

import pytest
import torch

import mergelab
from mergelab.errors import RecipeError
from tok_kit import WORDS, word_tokenizer, write_gpt2
from tok_family import family  # noqa: F401  (the fixture)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
CHATML = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
          "Hello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
LLAMA3 = ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
          "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def _recipe(family, **extra):
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(family[n][0]), "parameters": {"weight": 0.5}} for n in "ad"], **extra}


@pytest.mark.parametrize("template, expected", [("chatml", CHATML), ("llama3", LLAMA3), ("literal", "Hi|Bye|")])
@pytest.mark.parametrize("source", [None, "union"])
def test_chat_template_is_written_and_renders(family, tmp_path, template, expected, source):
    transformers = pytest.importorskip("transformers")
    text = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + '|' }}{% endif %}{% endfor %}"
            if template == "literal" else template)
    extra = {"chat_template": text, **({"tokenizer_source": source} if source else {})}
    mergelab.merge(_recipe(family, **extra), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "{%" in config["chat_template"]
    assert not (tmp_path / "out" / "chat_template.jinja").exists()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"), bos_token="<s>")
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == expected


def test_chat_template_auto_and_errors(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    with pytest.raises(RecipeError, match="none of the models has one"):
        mergelab.merge(_recipe(family, chat_template="auto"), tmp_path / "o1")
    with pytest.raises(RecipeError, match="not a template mergelab knows"):
        mergelab.merge(_recipe(family, chat_template="vicuna"), tmp_path / "o2")
    # auto: the template the models carry
    mergelab.merge(_recipe(family, chat_template="chatml"), tmp_path / "t1")
    rec = {"merge_method": "linear", "dtype": "float32", "chat_template": "auto",
           "models": [{"model": str(tmp_path / "t1"), "parameters": {"weight": 0.5}},
                      {"model": str(family["a"][0]), "parameters": {"weight": 0.5}}]}
    mergelab.merge(rec, tmp_path / "o3")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "o3"))
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == CHATML


def test_gpt2_layer_stacking_updates_n_layer(tmp_path):
    """Passthrough slices on GPT-2: n_layer (GPT-2's own key) is the stacked count; no num_hidden_layers is
    added beside it, and transformers builds exactly those layers with every weight present."""
    transformers = pytest.importorskip("transformers")
    tok = word_tokenizer(WORDS)
    g = torch.Generator().manual_seed(0)
    a = write_gpt2(tmp_path / "a", torch.randn(15, 8, generator=g), seed=1, layers=3, tok=tok)
    b = write_gpt2(tmp_path / "b", torch.randn(15, 8, generator=g), seed=2, layers=3, tok=tok)
    rec = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]}
    mergelab.merge(rec, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["n_layer"] == 4 and "num_hidden_layers" not in config
    model, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert len(model.transformer.h) == 4 and not info["missing_keys"]
    src = transformers.GPT2LMHeadModel.from_pretrained(str(b))
    torch.testing.assert_close(model.transformer.h[3].mlp.c_fc.weight, src.transformer.h[2].mlp.c_fc.weight)


def test_config_key_spellings():
    from mergelab.checkpoint.assets import updated_config as _updated_config

    assert _updated_config({"n_layer": 2}, {"num_hidden_layers": 4}) == {"n_layer": 4}
    assert _updated_config({"num_hidden_layers": 2}, {"num_hidden_layers": 4}) == {"num_hidden_layers": 4}
    assert _updated_config({}, {"num_hidden_layers": 4}) == {"num_hidden_layers": 4}
    got = _updated_config({"text_config": {"num_hidden_layers": 2, "vocab_size": 9}}, {"vocab_size": 12})
    assert got == {"text_config": {"num_hidden_layers": 2, "vocab_size": 12}}
