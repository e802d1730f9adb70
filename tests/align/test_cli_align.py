"""`mergelab align`: HF folders and state dicts, aligned back exactly; bad input exits 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from align_models import MLP, tiny_llama
from typer.testing import CliRunner

import mergelab.align as al
from mergelab.checkpoint.reader import Checkpoint
from mergelab.cli.main import app

HERE = Path(__file__).parent


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _permuted_copy(state, spec, seed=5):
    perms = al.random_perms(spec, torch.Generator().manual_seed(seed))
    _permuted_copy.moved = sum(int((p != torch.arange(len(p))).any()) for p in perms.values())
    return al.apply_permutations(spec, state, perms)


def test_hf_folder_weight_and_activation(tmp_path):
    a = tiny_llama(0)
    a.save_pretrained(tmp_path / "a")
    spec = al.spec_for(a)
    b = tiny_llama(0)
    b.load_state_dict(_permuted_copy(a.state_dict(), spec))
    b.save_pretrained(tmp_path / "b")
    text = tmp_path / "ids.pt"
    torch.save(torch.randint(0, 50, (600,), generator=torch.Generator().manual_seed(0)), text)
    for method in ("weight", "activation"):
        out = tmp_path / f"out-{method}"
        r = run("align", tmp_path / "a", tmp_path / "b", out, "--method", method, "--data", text)
        assert r.exit_code == 0, r.output
        ck = Checkpoint(out)
        for k, v in a.state_dict().items():
            if k in ck:
                assert torch.equal(ck[k], v), (method, k)
        assert (out / "config.json").is_file()
        info = json.loads((out / "alignment.json").read_text())
        assert info["groups"] == len(spec.groups) and info["moved"] == _permuted_copy.moved > 0
    # the aligned folder is an ordinary model folder: a recipe merges it with A
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {tmp_path / 'out-weight'}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    r = run("merge", recipe, tmp_path / "merged")
    assert r.exit_code == 0, r.output
    merged = Checkpoint(tmp_path / "merged")
    b_state = b.state_dict()
    k = "model.layers.0.mlp.up_proj.weight"  # B unaligned differs from A; aligned, the mean is A itself
    assert not torch.equal(b_state[k], a.state_dict()[k])
    torch.testing.assert_close(merged[k], a.state_dict()[k])


def test_state_dict_with_model_factory_and_errors(tmp_path):
    torch.manual_seed(0)
    a = MLP()
    spec = al.spec_for(a)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(_permuted_copy(a.state_dict(), spec), tmp_path / "b.pt")
    factory = f"{HERE / 'align_models.py'}:mlp"
    r = run("align", tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "out", "--model", factory)
    assert r.exit_code == 0, r.output
    ck = Checkpoint(tmp_path / "out")
    assert all(torch.equal(ck[k], v) for k, v in a.state_dict().items())

    r = run("align", tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "out", "--model", factory)
    assert r.exit_code == 2 and "exists" in r.output  # never over an existing output without --overwrite
    r = run("align", tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "out2")
    assert r.exit_code == 2 and "--model" in r.output
    torch.save(MLP(width=20).state_dict(), tmp_path / "wide.pt")
    r = run("align", tmp_path / "a.pt", tmp_path / "wide.pt", tmp_path / "out3", "--model", factory)
    assert r.exit_code == 2 and "layers.0.weight" in r.output and not (tmp_path / "out3").exists()
    r = run("align", tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "out4", "--model", factory,
            "--method", "activation")
    assert r.exit_code == 2 and "--data" in r.output


def test_recipe_key_align_weight_matching(tmp_path):
    """`align: weight_matching` in a recipe: B (A with its units permuted) comes back into A's basis, so the
    linear merge of A and B is A itself; without the key it is not. Inputs untouched, no temporary left."""
    a = tiny_llama(0)
    a.save_pretrained(tmp_path / "a")
    b = tiny_llama(0)
    b.load_state_dict(_permuted_copy(a.state_dict(), al.spec_for(a)))
    b.save_pretrained(tmp_path / "b")
    before = (tmp_path / "b" / "model.safetensors").read_bytes()
    body = (f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    (tmp_path / "aligned.yml").write_text(body + "align: weight_matching\n")
    (tmp_path / "plain.yml").write_text(body)
    assert run("merge", tmp_path / "aligned.yml", tmp_path / "m1", "--quiet").exit_code == 0
    assert run("merge", tmp_path / "plain.yml", tmp_path / "m2", "--quiet").exit_code == 0
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(Checkpoint(tmp_path / "m1")[k], a.state_dict()[k])
    assert not torch.allclose(Checkpoint(tmp_path / "m2")[k], a.state_dict()[k])
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "bad.yml").write_text(body + "align: activation_matching\n")  # needs data: not in recipes
    r = run("merge", tmp_path / "bad.yml", tmp_path / "m3")
    assert r.exit_code == 2 and "align" in r.output
