"""`mergelab analyze`: numbers checked against closed forms and numpy, bad input as exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mergelab.cli.main import app
from conftest import write_llama_family

EVALUATORS = '''
import torch
from torch import nn

def double_well(sd):
    w = sd["w"].double()
    return {"loss": float(((w * w - 1) ** 2).sum())}

def target(sd):  # sum_j (w_j - 1)^2
    return {"loss": float(((sd["w"].double() - 1) ** 2).sum())}

def bowl(sd):  # sum_j (w_j - 0.3)^2
    return {"loss": float(((sd["w"].double() - 0.3) ** 2).sum())}

def boom(sd):
    raise RuntimeError("kaboom")

def nan(sd):
    return {"loss": float("nan")}

def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
'''


def run(*args: str):
    return CliRunner().invoke(app, ["analyze", *map(str, args)])


@pytest.fixture
def files(tmp_path):
    """evalmod.py, vector "models" w.pt, and an MLP with its data."""
    (tmp_path / "evalmod.py").write_text(EVALUATORS)
    f = {"mod": tmp_path / "evalmod.py", "dir": tmp_path}
    for name, w in {"minus": [-1.0], "plus": [1.0], "three": [0.0, 0.0, 0.0], "zero2": [0.0, 0.0],
                    "ft1": [0.25, 0.0], "ft2": [0.0, 0.25], "o": [0.0, 0.0, 0.0], "a": [1.0, 0.0, 0.0],
                    "b": [0.0, 1.0, 0.0], "m": [0.5, 0.5, 0.2]}.items():
        f[name] = tmp_path / f"{name}.pt"
        torch.save({"w": torch.tensor(w, dtype=torch.float64)}, f[name])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():  # non-trivial running statistics, so a refresh visibly changes them
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    f["net"], f["net_sd"] = tmp_path / "net.pt", {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(f["net_sd"], f["net"])
    X, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    f["data"], f["X"], f["y"] = tmp_path / "data.pt", X.numpy(), y.numpy()
    torch.save({"X": X, "y": y}, f["data"])
    return f


def ok(result):
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def numpy_classifier(sd, X, y, bn_mean=None, bn_var=None):
    """Loss and accuracy of Linear -> BatchNorm (eval) -> ReLU -> Linear, written out in numpy."""
    p = {k: v.double().numpy() for k, v in sd.items()}
    h = X.astype(np.float64) @ p["0.weight"].T + p["0.bias"]
    mean = p["1.running_mean"] if bn_mean is None else bn_mean
    var = p["1.running_var"] if bn_var is None else bn_var
    h = np.maximum((h - mean) / np.sqrt(var + 1e-5) * p["1.weight"] + p["1.bias"], 0)
    logits = h @ p["3.weight"].T + p["3.bias"]
    log_prob = logits - logits.max(1, keepdims=True)
    log_prob -= np.log(np.exp(log_prob).sum(1, keepdims=True))
    return -log_prob[np.arange(len(y)), y].mean(), (logits.argmax(1) == y).mean()


# ----------------------------------------------------------------------------- path


def test_path_between_identical_classifiers_has_zero_barrier(files):
    out = files["dir"] / "path.json"
    ok(run("path", files["net"], files["net"], "--eval", "classifier", "--data", files["data"],
           "--model", f"{files['mod']}:mlp", "--points", 5, "--json", out))
    got = json.loads(out.read_text())
    assert got["barriers"] == {"loss": 0.0, "accuracy": 0.0}
    assert got["merge_gain"] == {"loss": 0.0, "accuracy": 0.0}
    loss, acc = numpy_classifier(files["net_sd"], files["X"], files["y"])
    assert got["metrics"]["loss"] == pytest.approx([loss] * 5, rel=1e-5)
    assert got["metrics"]["accuracy"] == pytest.approx([acc] * 5)


def test_double_well_path_barrier_is_one_and_is_the_headline(files):
    # L(w) = (w^2 - 1)^2 from w = -1 to 1: L = 0 at both ends, 1 at the midpoint w = 0.
    out = files["dir"] / "path.json"
    result = ok(run("path", files["minus"], files["plus"], "--eval", f"{files['mod']}:double_well",
                    "--points", 5, "--json", out, "--plot", files["dir"] / "path.png"))
    got = json.loads(out.read_text())
    alphas = np.array(got["alphas"])
    assert got["metrics"]["loss"] == pytest.approx((((2 * alphas - 1) ** 2 - 1) ** 2).tolist())
    assert got["barriers"]["loss"] == pytest.approx(1.0) and got["merge_gain"]["loss"] == pytest.approx(1.0)
    assert "loss barrier 1;" in result.output and "loss merge gain +1" in result.output
    assert (files["dir"] / "path.png").read_bytes()[:4] == b"\x89PNG"


def test_bn_data_recomputes_batchnorm_statistics_at_each_point(files):
    out = files["dir"] / "path.json"
    ok(run("path", files["net"], files["net"], "--eval", "classifier", "--data", files["data"], "--model",
           f"{files['mod']}:mlp", "--points", 3, "--bn-data", files["data"], "--batch-size", 64, "--json", out))
    sd = files["net_sd"]
    h = files["X"].astype(np.float64) @ sd["0.weight"].double().numpy().T + sd["0.bias"].double().numpy()
    # One batch holds all 40 examples: the refreshed statistics are its mean and unbiased variance.
    loss, _ = numpy_classifier(sd, files["X"], files["y"], h.mean(0), h.var(0, ddof=1))
    stale, _ = numpy_classifier(sd, files["X"], files["y"])
    got = json.loads(out.read_text())["metrics"]["loss"]
    assert got == pytest.approx([loss] * 3, rel=1e-4) and abs(loss - stale) > 1e-3


def save_word_tokenizer(folder):
    """A word-level tokenizer in `folder`: "w<i>" -> id i, built offline with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({**{f"w{i}": i for i in range(95)}, "[UNK]": 95}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def test_causal_lm_path_on_a_tied_tiny_llama_from_tokens_and_text(tmp_path):
    paths = write_llama_family(tmp_path, names=("a",), tie_word_embeddings=True)  # lm_head stored as the embedding
    save_word_tokenizer(paths["a"])
    ids = torch.randint(0, 95, (33,), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "text.txt").write_text(" ".join(f"w{i}" for i in ids.tolist()))
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(paths["a"]).eval()
    windows = ids.unfold(0, 9, 8)  # 4 windows of 9 tokens, each predicting its last 8
    with torch.no_grad():
        want = float(lm(windows, labels=windows).loss)  # HF shifts the labels itself
    for source in (["--tokens", tmp_path / "ids.pt"], ["--text", tmp_path / "text.txt"]):
        out = tmp_path / "lm.json"
        ok(run("path", paths["a"], paths["a"], "--eval", "causal-lm", *source, "--seq-len", 8, "--points", 2,
               "--json", out, "--overwrite"))  # the second source replaces the first one's report
        got = json.loads(out.read_text())
        assert got["metrics"]["loss"] == pytest.approx([want] * 3, rel=1e-5)
        assert got["barriers"]["loss"] == 0.0


# ----------------------------------------------------------------------------- scaling and plane


def test_scaling_best_lambda_matches_the_hand_computation(files):
    # base 0, task vectors (0.25, 0) and (0, 0.25): loss(lambda) = 2 (0.25 lambda - 1)^2, minimal at 4.
    out, png = files["dir"] / "scaling.json", files["dir"] / "scaling.png"
    result = ok(run("scaling", files["zero2"], files["ft1"], files["ft2"], "--eval", f"{files['mod']}:target",
                    "--lambdas", "0,1,2,3,4,5", "--json", out, "--plot", png))
    got = json.loads(out.read_text())
    lam = np.arange(6.0)
    assert got["metrics"]["loss"] == pytest.approx((2 * (0.25 * lam - 1) ** 2).tolist())
    assert got["best_lambda"] == 4.0 and got["best_value"] == pytest.approx(0.0)
    assert "best lambda 4" in result.output and png.read_bytes()[:4] == b"\x89PNG"


def test_plane_grid_matches_the_closed_form_and_writes_a_png(files):
    out, png = files["dir"] / "plane.json", files["dir"] / "plane.png"
    result = ok(run("plane", files["o"], files["a"], files["b"], "--extra", files["m"], "--eval",
                    f"{files['mod']}:bowl", "--grid", 5, "--margin", 0.25, "--json", out, "--plot", png))
    got = json.loads(out.read_text())
    assert got["points"] == {"o.pt": [0, 0], "a.pt": [1, 0], "b.pt": [0, 1], "m.pt": [0.5, 0.5]}
    assert got["off_plane"]["m.pt"] == pytest.approx(0.2)
    assert got["x"] == pytest.approx([-0.25, 0.125, 0.5, 0.875, 1.25]) and got["y"] == got["x"]
    x, y = np.meshgrid(got["x"], got["y"])  # [iy][ix], as the JSON stores it
    # The plane is z = 0, so each point is (x, y, 0) and its third coordinate adds 0.3^2.
    assert np.allclose(got["metrics"]["loss"], (x - 0.3) ** 2 + (y - 0.3) ** 2 + 0.09)
    head = got["headline"]["loss"]
    assert head["grid_best"] == pytest.approx(2 * 0.175**2 + 0.09) and head["at"] == pytest.approx([0.125, 0.125])
    assert head["best_model"] == "m.pt" and head["best_model_value"] == pytest.approx(0.08 + 0.01)
    assert "plane min loss" in result.output and png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- noise scale


@pytest.mark.parametrize("args, want", [
    (["--lr", 0.1, "--batch", 128, "--momentum", 0.9], 0.1 / (128 * 0.1)),
    (["--lr", 0.1, "--batch", 128, "--momentum", 0.9, "--k", 2], 0.1 / (128 * 0.1**2)),
    (["--lr", 0.1, "--batch", 128, "--aug-var", 2], 0.1 / 128 * 2),
])
def test_noise_scale_matches_the_formula(tmp_path, args, want):
    ok(run("noise-scale", *args, "--json", tmp_path / "s.json"))
    assert json.loads((tmp_path / "s.json").read_text())["noise_scale"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("world, want", [([], 3e-4 / (8 * 4 * 0.1)), (["--world-size", 2], 3e-4 / (8 * 4 * 2 * 0.1))])
def test_noise_scale_from_a_trainer_folder(tmp_path, world, want):
    (tmp_path / "training_args.json").write_text(json.dumps(
        {"learning_rate": 3e-4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4,
         "optim": "adamw_torch", "adam_beta1": 0.9}))
    out = tmp_path.parent / f"{tmp_path.name}-s.json"  # not inside the trainer folder, which is an input
    result = ok(run("noise-scale", "--trainer-state", tmp_path, *world, "--json", out))
    got = json.loads(out.read_text())
    assert got["noise_scale"] == pytest.approx(want, rel=1e-12) and got["batch_size"] == 32 * (len(world) or 1)
    assert "adam_beta1" in result.output  # the assumption made reading the optimizer is shown


# ----------------------------------------------------------------------------- errors


def bad_cases(f):
    mod, well = f["mod"], f"{f['mod']}:double_well"
    return {
        "shapes": (["path", f["minus"], f["three"], "--eval", well], ["tensor w has shape", "(3,)"]),
        "raises": (["path", f["minus"], f["plus"], "--eval", f"{mod}:boom"], ["boom failed at alpha=0", "kaboom"]),
        "nan": (["path", f["minus"], f["plus"], "--eval", f"{mod}:nan"], ["loss=nan", "alpha=0"]),
        "spec": (["path", f["minus"], f["plus"], "--eval", "accuracy"], ["'accuracy' is not an evaluator"]),
        "eval file": (["path", f["minus"], f["plus"], "--eval", f"{f['dir']}/nope.py:f"], ["nope.py does not exist"]),
        "no function": (["path", f["minus"], f["plus"], "--eval", f"{mod}:nothing"], ["no callable named 'nothing'"]),
        "model file": (["path", f["minus"], f["dir"] / "gone.pt", "--eval", well], ["gone.pt does not exist"]),
        "classifier": (["path", f["net"], f["net"], "--eval", "classifier", "--data", f["data"]], ["--model"]),
        "data file": (["path", f["net"], f["net"], "--eval", "classifier", "--data", f["dir"] / "no.pt", "--model",
                       f"{mod}:mlp"], ["--data", "no.pt does not exist"]),
        "factory": (["path", f["net"], f["net"], "--eval", "classifier", "--data", f["data"], "--model",
                     f"{mod}:double_well"], ["--model", "calling it failed"]),
        "bad device": (["path", f["net"], f["net"], "--eval", "classifier", "--data", f["data"], "--model",
                        f"{mod}:mlp", "--device", "gpu9"], ["--device gpu9"]),
        "unused": (["path", f["minus"], f["plus"], "--eval", well, "--data", f["data"]], ["--data not used"]),
        "bn": (["path", f["minus"], f["plus"], "--eval", well, "--bn-data", f["data"]], ["--bn-data needs a module"]),
        "device": (["path", f["minus"], f["plus"], "--eval", well, "--device", "cpu"], ["--device not used"]),
        "lm": (["path", f["minus"], f["plus"], "--eval", "causal-lm", "--tokens", f["data"]], ["config.json"]),
        "lambdas": (["scaling", f["zero2"], f["ft1"], "--eval", well, "--lambdas", "0,x"], ["--lambdas '0,x'"]),
        "select": (["scaling", f["zero2"], f["ft1"], "--eval", well, "--select", "accuracy"], ["select='accuracy'"]),
        "plane line": (["plane", f["o"], f["a"], f["a"], "--eval", f"{mod}:bowl"], ["lie on one line"]),
        "ns neither": (["noise-scale", "--lr", 0.1], ["give --lr and --batch"]),
        "ns both": (["noise-scale", "--lr", 0.1, "--trainer-state", f["dir"]], ["not both"]),
        "ns value": (["noise-scale", "--lr", 0.1, "--batch", 8, "--momentum", 1], ["momentum must be in [0, 1)"]),
        "ns folder": (["noise-scale", "--trainer-state", f["dir"]], ["no training_args.json"]),
    }


CASES = ("shapes", "raises", "nan", "spec", "eval file", "no function", "model file", "classifier", "data file",
         "factory", "bad device", "unused", "bn", "device", "lm", "lambdas", "select", "plane line", "ns neither", "ns both", "ns value",
         "ns folder")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_message_with_exit_code_2(files, case):
    cases = bad_cases(files)
    assert set(cases) == set(CASES)
    args, needles = cases[case]
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
