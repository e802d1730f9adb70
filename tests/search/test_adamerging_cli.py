"""`mergelab adamerging` and mergelab.adamerging on Hugging Face folders: tiny GPT-2 causal LMs (text
files through a real tokenizer) and a sequence classifier (token ids in a .safetensors file); the
written recipe merges with `mergelab merge` to the functional model at the learned coefficients."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import mergelab
from mergelab.checkpoint.tensor_file import load_tensors, save_tensors
from mergelab.cli.main import app
from mergelab.search.adamerging import MergedFunction

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tokenizer"))
from tok_kit import WORDS, save_tokenizer, word_tokenizer  # noqa: E402

TEXT = ["the cat sat on the mat", "a dog ran far away", "the big red dog sat", "a cat ran on a mat"]


def _family(tmp_path, cls_name, **extra):
    import transformers
    from transformers import GPT2Config

    cls = getattr(transformers, cls_name)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(WORDS) + 3, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, **extra)
    torch.manual_seed(0)
    base = cls(cfg)
    paths = []
    for k, name in enumerate(("base", "a", "b")):
        model = cls(cfg)
        g = torch.Generator().manual_seed(k)
        model.load_state_dict({n: v + (0.3 if k else 0.0) * torch.randn(v.shape, generator=g)
                               for n, v in base.state_dict().items()})
        model.save_pretrained(tmp_path / name)
        paths.append(tmp_path / name)
    save_tokenizer(word_tokenizer(WORDS), paths[0], pad_token="<unk>", eos_token="</s>")
    return paths


def _check_merge(tmp_path, recipe, paths, cls_name, lambdas):
    import transformers

    out = tmp_path / "merged"
    mergelab.merge(recipe, out)
    merged = load_tensors(out / "model.safetensors")
    cls = getattr(transformers, cls_name)
    module = cls.from_pretrained(str(paths[0]), dtype=torch.float32)
    fn = MergedFunction(module, [cls.from_pretrained(str(p), dtype=torch.float32) for p in paths[1:]],
                        granularity="task" if lambdas.dim() == 1 else "layer")
    for n, t in fn.params(lambdas).items():
        assert torch.equal(merged[n], t.detach()), n


def test_cli_on_causal_lm_folders_and_text_files(tmp_path):
    paths = _family(tmp_path, "GPT2LMHeadModel")
    files = []
    for k in range(2):
        files.append(tmp_path / f"task{k}.txt")
        files[-1].write_text("\n".join(TEXT[k:] + TEXT[:k]) + "\n")
    recipe, curve = tmp_path / "ada.yml", tmp_path / "ada.json"
    result = CliRunner().invoke(app, ["adamerging", *map(str, paths), "--data", f"one={files[0]}", "--data",
                                      f"two={files[1]}", "--steps", "15", "--lr", "0.05", "--out", str(recipe),
                                      "--json", str(curve), "--quiet", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "entropy" in result.output and "recipe written" in result.output
    rec = yaml.safe_load(recipe.read_text())
    assert rec["merge_method"] == "task_arithmetic" and rec["base_model"] == str(paths[0])
    report = json.loads(curve.read_text())
    assert report["tasks"] == ["one", "two"] and len(report["losses"]) == 16
    assert report["losses"][-1] < report["losses"][0]
    weights = [m["parameters"]["weight"] for m in rec["models"]]
    assert weights == report["lambdas"]
    _check_merge(tmp_path, rec, paths, "GPT2LMHeadModel", torch.tensor(weights))


def test_api_on_a_sequence_classifier_with_token_ids(tmp_path):
    paths = _family(tmp_path, "GPT2ForSequenceClassification", num_labels=3)
    files = []
    for k in range(2):
        files.append(tmp_path / f"ids{k}.safetensors")
        ids = torch.randint(1, len(WORDS) + 3, (6, 5), generator=torch.Generator().manual_seed(k))
        save_tensors(files[-1], {"input_ids": ids})
    r = mergelab.adamerging(paths[0], paths[1:], {"x": files[0], "y": files[1]}, granularity="layer", steps=10,
                            lr=0.05, batch_size=3)
    assert r.lambdas.shape[0] == 2 and r.losses[-1] < r.losses[0]
    _check_merge(tmp_path, r.recipe(str(paths[0]), [str(p) for p in paths[1:]]), paths,
                 "GPT2ForSequenceClassification", r.lambdas)


@pytest.mark.parametrize("args,message", [
    (["--data", "only=MISSING"], "is not a file"),
    (["--data", "a=FILE", "--data", "a=FILE"], "given twice"),
    (["--data", "a=FILE"], "1 time(s) for 2"),
])
def test_cli_errors_name_the_flag(tmp_path, args, message):
    file = tmp_path / "t.txt"
    file.write_text("x\n")
    args = [a.replace("FILE", str(file)).replace("MISSING", str(tmp_path / "none.txt")) for a in args]
    result = CliRunner().invoke(app, ["adamerging", str(tmp_path), str(tmp_path / "a"), str(tmp_path / "b"),
                                      *args, "--out", str(tmp_path / "r.yml")])
    assert result.exit_code == 2 and message in result.output, result.output


def test_cli_on_weight_files_with_a_model_factory(tmp_path):
    from adamerging_digits import digits_suite

    base, models, batches, _ = digits_suite()
    paths = []
    for name, m in (("base", base), ("a", models[0]), ("b", models[1]), ("c", models[2])):
        paths.append(tmp_path / f"{name}.safetensors")
        save_tensors(paths[-1], m.state_dict())
    args = []
    for task, b in batches.items():
        save_tensors(tmp_path / f"{task}.safetensors", {"x": torch.cat(b)})
        args += ["--data", f"{task}={tmp_path / f'{task}.safetensors'}"]
    factory = f"{Path(__file__).resolve().parent / 'adamerging_digits.py'}:mlp32"
    recipe = tmp_path / "ada.yml"
    result = CliRunner().invoke(app, ["adamerging", *map(str, paths), *args, "--model", factory, "--steps", "20",
                                      "--lr", "0.01", "--granularity", "layer", "--out", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    # the same run through the Python API on the modules gives the same coefficients
    r = mergelab.adamerging(base, models, {t: list(torch.cat(b).split(16)) for t, b in batches.items()},
                            granularity="layer", steps=20, lr=0.01)
    rec = yaml.safe_load(recipe.read_text())
    assert rec == r.recipe(str(paths[0]), [str(p) for p in paths[1:]])


def test_weight_files_without_a_factory_are_refused_with_the_fix(tmp_path):
    file = tmp_path / "x.safetensors"
    save_tensors(file, {"x": torch.zeros(2, 3)})
    result = CliRunner().invoke(app, ["adamerging", str(file), str(file), "--data", f"t={file}",
                                      "--out", str(tmp_path / "r.yml")])
    assert result.exit_code == 2 and "no config.json" in result.output and "--model" in result.output
