"""extract-lora: exact recovery, optimal error, PEFT round trip, up-front validation, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from mergelab.errors import ShapeMismatch
from mergelab.lora.extract import extract, low_rank

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"


def _cfg(vocab=40):
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and a fine-tune = base + a rank-2 update on every linear layer + a changed final norm."""
    root = tmp_path_factory.mktemp("ex")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_cfg()).eval()
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    sd = base.state_dict()
    for name, t in sd.items():
        if name.endswith("proj.weight") or name == "lm_head.weight":
            sd[name] = t + torch.randn(t.shape[0], 2, generator=g) @ torch.randn(2, t.shape[1], generator=g) * 0.1
    sd["model.norm.weight"] = sd["model.norm.weight"] + 0.05
    ft = transformers.LlamaForCausalLM(_cfg()).eval()
    ft.load_state_dict(sd)
    ft.save_pretrained(root / "ft")
    return root


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_exact_rank_update_is_recovered_and_peft_reproduces_the_finetune(pair, tmp_path):
    report = extract(pair / "ft", pair / "base", tmp_path / "ad", rank=2, save_other=True)
    assert report.saved == ["model.norm.weight"] and not report.left_out
    assert min(r["energy"] for r in report.layers) > 1 - 1e-6
    model = peft.PeftModel.from_pretrained(_load(pair / "base"), str(tmp_path / "ad")).eval()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _load(pair / "ft")(ids).logits, atol=1e-5, rtol=1e-4)
    on_disk = json.loads((tmp_path / "ad" / "mergelab_extract_report.json").read_text())
    assert len(on_disk["layers"]) == len(report.layers) == 2 * 7 + 1


def test_norm_is_reported_not_dropped_without_save_other(pair, tmp_path):
    report = extract(pair / "ft", pair / "base", tmp_path / "ad", rank=2)
    assert [t for t, _ in report.left_out] == ["model.norm.weight"]


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_rank_r_plus_noise_error_is_the_optimal_error(method):
    g = torch.Generator().manual_seed(3)
    m, n, r = 120, 90, 4
    delta = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) + 1e-3 * torch.randn(m, n, generator=g)
    b, a, energy = low_rank(delta, r, method=method)
    s = torch.linalg.svdvals(delta.double())
    optimal = float(s[r:].pow(2).sum().sqrt())  # Eckart-Young: the tail of the spectrum
    err = float(torch.linalg.matrix_norm((delta - b @ a).double()))
    assert err == pytest.approx(optimal, rel=1e-3 if method == "full" else 2e-2)
    assert energy == pytest.approx(float(s[:r].pow(2).sum() / s.pow(2).sum()), rel=1e-5)


def test_sv_epsilon_lowers_the_rank():
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(20, 2, generator=g) @ torch.randn(2, 30, generator=g)
    b, a, _ = low_rank(delta, 8, method="full", sv_epsilon=1e-3)
    assert b.shape == (20, 2) and a.shape == (2, 30)


def test_vocabulary_mismatch_fails_before_any_svd(pair, tmp_path, monkeypatch):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_cfg(vocab=44)).save_pretrained(tmp_path / "big")
    import mergelab.lora.extract as ex

    monkeypatch.setattr(ex, "low_rank", lambda *a, **k: pytest.fail("an SVD ran before validation"))
    with pytest.raises(ShapeMismatch, match="vocabularies differ"):
        extract(tmp_path / "big", pair / "base", tmp_path / "ad", rank=2)
    assert not (tmp_path / "ad").exists()


def test_include_embeddings(pair, tmp_path):
    sd = _load(pair / "ft").state_dict()
    g = torch.Generator().manual_seed(5)
    sd["model.embed_tokens.weight"] += torch.randn(40, 1, generator=g) @ torch.randn(1, 16, generator=g)
    ft = transformers.LlamaForCausalLM(_cfg())
    ft.load_state_dict(sd)
    ft.save_pretrained(tmp_path / "ft2")
    extract(tmp_path / "ft2", pair / "base", tmp_path / "ad", rank=2, save_other=True, include_embeddings=True)
    model = peft.PeftModel.from_pretrained(_load(pair / "base"), str(tmp_path / "ad")).eval()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ft.eval()(ids).logits, atol=1e-5, rtol=1e-4)


def test_cli_extract_and_one_line_error(pair, tmp_path):
    from typer.testing import CliRunner

    from mergelab.cli.main import app

    args = ["extract-lora", str(pair / "ft"), str(pair / "base"), str(tmp_path / "ad"), "--rank", "2", "--quiet"]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file() and "left out" in ok.stdout
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_bad_arguments_fail_before_reading(pair, tmp_path):
    from mergelab.errors import MergeError

    with pytest.raises(MergeError, match="rank"):
        extract(pair / "ft", pair / "base", tmp_path / "a", rank=0)
    with pytest.raises(MergeError, match="svd"):
        extract(pair / "ft", pair / "base", tmp_path / "a", rank=2, svd="exact")
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="CUDA"):
            extract(pair / "ft", pair / "base", tmp_path / "a", rank=2, device="cuda")
    with pytest.raises(MergeError, match="input"):
        extract(pair / "ft", pair / "base", pair / "ft", rank=2, overwrite=True)
    assert not (tmp_path / "a").exists()
