"""Issue 10's cases, one test each: never destroy data, never write a wrong model with exit code 0,
and every bad input refused with one line and exit code 2 (no traceback, no hang).

Each test reproduces the case as a user would hit it, through the `mergelab` command.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab.checkpoint.output import MARKER, check_output, stale_partials
from mergelab.cli.main import app
from mergelab.errors import OutputError


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, *fragments: str) -> None:
    """Exit code 2, one error line naming what is at fault, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    for f in fragments:
        assert f in text, (f, text)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def _toy(folder: Path, value: float, names=("w", "b")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.full((4, 3), value) if n == "w" else torch.full((4,), value) for n in names},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": 1}))
    return folder


@pytest.fixture()
def pair(tmp_path):
    a = _toy(tmp_path / "a", 1.0)
    b = _toy(tmp_path / "b", 3.0)
    recipe = tmp_path / "ok.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}))
    return a, b, recipe


# -- 1. never destroy data ---------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["", "."])
def test_overwrite_never_empties_the_current_folder(pair, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    before = tree_hash(tmp_path)
    assert_refused(run("merge", pair[2], out, "--overwrite", "--quiet"), "refusing" if out else "empty")
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("target", ["/", "~"])
def test_root_and_home_are_never_outputs(pair, target):
    assert_refused(run("merge", pair[2], target, "--overwrite", "--quiet"), "refusing")


def test_symlinked_out_dir_is_refused_and_its_target_kept(pair, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    link = tmp_path / "out"
    link.symlink_to(precious)
    assert_refused(run("merge", pair[2], link, "--overwrite", "--quiet"), "symbolic link")
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_an_ancestor_of_an_input_is_never_replaced(pair, tmp_path):
    before = tree_hash(tmp_path)
    assert_refused(run("merge", pair[2], tmp_path, "--overwrite", "--quiet"), "contains the input")
    assert tree_hash(tmp_path) == before


def test_overwrite_replaces_only_folders_mergelab_wrote(pair, tmp_path):
    other = tmp_path / "somebody-elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert_refused(run("merge", pair[2], other, "--overwrite", "--quiet"), "did not write")
    assert (other / "notes.txt").read_text() == "keep me"
    out = tmp_path / "merged"
    assert run("merge", pair[2], out, "--quiet").exit_code == 0
    assert (out / MARKER).is_file()
    assert_refused(run("merge", pair[2], out, "--quiet"), "already exists")
    assert run("merge", pair[2], out, "--overwrite", "--quiet").exit_code == 0  # its own output: replaced
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.full((4, 3), 2.0))


def _trainer_checkpoint(folder: Path) -> Path:
    _toy(folder, 1.0)
    params = {"w": torch.zeros(4, 3), "b": torch.zeros(4)}
    state = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(p),
                           "exp_avg_sq": torch.full_like(p, 0.01)} for i, p in enumerate(params.values())},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                               "params": [0, 1]}]}
    torch.save(state, folder / "optimizer.pt")
    return folder


def test_stats_never_writes_over_an_input(tmp_path):
    ck = _trainer_checkpoint(tmp_path / "ck" / "checkpoint-1")
    weights = ck / "model.safetensors"
    before = weights.read_bytes()
    assert_refused(run("stats", "optimizer", ck, weights), "refusing", "input")
    assert_refused(run("stats", "optimizer", ck, weights, "--overwrite"), "refusing", "input")
    assert weights.read_bytes() == before


def test_stats_refuses_an_existing_file_without_overwrite(tmp_path):
    ck = _trainer_checkpoint(tmp_path / "checkpoint-1")
    out = tmp_path / "adam.safetensors"
    out.write_text("not mine")
    assert_refused(run("stats", "optimizer", ck, out), "already exists")
    assert out.read_text() == "not mine"


def test_inspect_and_analyze_outputs_go_through_the_same_checks(pair, tmp_path):
    a, b, _ = pair
    assert_refused(run("inspect", a, b, "--json", a / "report.json"), "refusing", "input")
    assert not (a / "report.json").exists()
    existing = tmp_path / "r.json"
    existing.write_text("{}")
    assert_refused(run("inspect", a, b, "--json", existing), "already exists")
    assert run("inspect", a, b, "--json", existing, "--overwrite").exit_code == 0
    assert "groups" in json.loads(existing.read_text()) or json.loads(existing.read_text())
    missing_parent = tmp_path / "new" / "dir" / "x.json"
    assert run("inspect", a, b, "--json", missing_parent).exit_code == 0 and missing_parent.is_file()
    assert_refused(run("analyze", "noise-scale", "--lr", "0.1", "--batch", "8", "--json", existing), "already exists")


def test_recover_puts_resume_state_inside_the_atomic_folder(tmp_path, monkeypatch):
    from mergelab.checkpoint import writer

    run_dir = tmp_path / "run"
    for i in range(3):
        _trainer_checkpoint(run_dir / f"checkpoint-{(i + 1) * 10}")
        (run_dir / f"checkpoint-{(i + 1) * 10}" / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    real = writer._copy_file

    def full_disk(src, dst):  # the disk fills while the resume state is copied
        if Path(src).name == "trainer_state.json":
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(writer, "_copy_file", full_disk)
    out = tmp_path / "resumed"
    assert_refused(run("recover", run_dir, out), "disk full")
    assert not out.exists() and not list(tmp_path.glob(".resumed.partial-*"))
    monkeypatch.setattr(writer, "_copy_file", real)
    assert run("recover", run_dir, out).exit_code == 0
    assert (out / "trainer_state.json").read_text() == json.dumps({"log_history": []})
    assert (out / "optimizer.pt").is_file()


def test_stale_partials_are_reported_and_removed_only_with_consent(pair, tmp_path):
    dead = tmp_path / ".merged.partial-999999999-0123abcd"  # a pid that cannot be running
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    result = run("merge", pair[2], tmp_path / "merged", "--quiet")
    assert result.exit_code == 0 and "--clean-partials" in " ".join(result.output.split())
    assert dead.exists()
    result = run("merge", pair[2], tmp_path / "merged2", "--quiet", "--clean-partials")
    assert result.exit_code == 0 and not dead.exists()
    live = tmp_path / f".x.partial-{os.getppid()}-0123abcd"  # a running process's temporary: not stale
    live.mkdir()
    assert all(p != live for p, _ in stale_partials(tmp_path))


def test_check_output_refuses_the_dangerous_paths_directly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("", " ", ".", "/", str(Path.home()), str(tmp_path.parent)):
        with pytest.raises(OutputError):
            check_output(bad, kind="folder", overwrite=True)


# -- 2. never write a wrong model with exit code 0 ---------------------------------------------------


def test_out_shard_size_5B_is_mergekits_five_billion(pair, tmp_path):
    out = tmp_path / "o"
    assert run("merge", pair[2], out, "--out-shard-size", "5B", "--quiet").exit_code == 0
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    for bad in ("5G", "five", "1e400", "-3GB", "0", "1.5"):
        assert_refused(run("merge", pair[2], tmp_path / "o2", "--out-shard-size", bad, "--quiet"), "shard size")
    assert not (tmp_path / "o2").exists()


def test_parse_size_units_against_hand_values():
    from mergelab.checkpoint.writer import parse_size

    assert parse_size("5B") == 5 * 10**9 == parse_size("5b") == parse_size("5GB")
    assert parse_size("500M") == 5 * 10**8 and parse_size("100K") == 10**5
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1e9") == 10**9 and parse_size(123) == 123


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "'nan'", "'inf'"])
def test_non_finite_recipe_numbers_are_refused(pair, tmp_path, value):
    a, b, _ = pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: {value}}}\n"
                      f"  - model: {b}\n    parameters: {{weight: 0.5}}\n")
    assert_refused(run("merge", recipe, tmp_path / "o", "--quiet"), "models[0].parameters.weight", "finite")
    assert not (tmp_path / "o").exists()


def test_nan_in_an_input_tensor_stops_the_merge_unless_allowed(tmp_path):
    a = _toy(tmp_path / "a", 1.0)
    b = _toy(tmp_path / "b", 3.0)
    t = load_file(str(b / "model.safetensors"))
    t["w"][1, 2] = float("nan")
    save_file(t, str(b / "model.safetensors"))
    for method in ("linear", "ties"):
        base = _toy(tmp_path / "base", 0.0)
        d = {"merge_method": method, "models": [{"model": str(a), "parameters": {"weight": 0.5, "density": 0.5}},
                                                {"model": str(b), "parameters": {"weight": 0.5, "density": 0.5}}]}
        if method == "ties":
            d["base_model"] = str(base)
        else:
            for m in d["models"]:
                m["parameters"].pop("density")
        recipe = tmp_path / f"{method}.yml"
        recipe.write_text(yaml.safe_dump(d))
        assert_refused(run("merge", recipe, tmp_path / f"o-{method}", "--quiet"), "w (", "NaN", "--allow-nonfinite")
        assert not (tmp_path / f"o-{method}").exists()
        result = run("merge", recipe, tmp_path / f"o-{method}", "--quiet", "--allow-nonfinite")
        assert result.exit_code == 0 and "NaN/Inf" in result.output
        report = json.loads((tmp_path / f"o-{method}" / "mergelab_report.json").read_text())
        assert report["nonfinite_inputs"] == [f"w ({b})"]


def test_slices_past_the_last_layer_are_refused(tmp_path):
    a = _toy(tmp_path / "a", 1.0, names=("model.layers.0.w", "model.layers.1.w", "lm_head.weight"))
    (a / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": 2}))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 10]}]}]}))
    assert_refused(run("merge", recipe, tmp_path / "o", "--quiet"), "layer_range", "goes past the 2 layers")
    assert not (tmp_path / "o").exists()


def test_zero_weight_sum_is_refused_before_the_writer_starts(pair, tmp_path):
    a, b, _ = pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"normalize": True}, "models": [
        {"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": -1.0}}]}))
    result = run("merge", recipe, tmp_path / "o", "--dry-run")
    assert_refused(result, "sum to zero")  # found while planning: a dry run already says so


def _run_dir(tmp_path: Path, drop_bias_at: int | None = None, nan_at: int | None = None) -> Path:
    run_dir = tmp_path / "run"
    for i in range(3):
        names = ("w",) if i == drop_bias_at else ("w", "b")
        folder = _toy(run_dir / f"checkpoint-{(i + 1) * 10}", float(i), names=names)
        if i == nan_at:
            t = load_file(str(folder / "model.safetensors"))
            t["w"][0, 0] = float("nan")
            save_file(t, str(folder / "model.safetensors"))
    return run_dir


def test_average_refuses_checkpoints_with_different_tensors_or_reports_them(tmp_path):
    run_dir = _run_dir(tmp_path, drop_bias_at=0)
    assert_refused(run("average", run_dir, tmp_path / "o", "--quiet"), "b is missing from", "checkpoint-10")
    assert not (tmp_path / "o").exists()
    result = run("average", run_dir, tmp_path / "o", "--quiet", "--allow-missing-tensors")
    assert result.exit_code == 0, result.output
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert torch.allclose(got["w"], torch.full((4, 3), 1.0))  # (0 + 1 + 2) / 3
    assert torch.allclose(got["b"], torch.full((4,), 1.5))  # only checkpoints 20 and 30 hold b: (1 + 2) / 2
    info = json.loads((tmp_path / "o" / "mergelab_average.json").read_text())
    assert list(info["tensors_from_fewer_checkpoints"]) == ["b"]
    assert len(info["tensors_from_fewer_checkpoints"]["b"]) == 2


def test_average_never_averages_nan_in_silently(tmp_path):
    run_dir = _run_dir(tmp_path, nan_at=1)
    result = run("average", run_dir, tmp_path / "o", "--quiet")
    assert_refused(result, "checkpoint-20", "NaN", "--skip-unstable")
    assert "cosine nan" not in result.output
    assert not (tmp_path / "o").exists()
    assert run("average", run_dir, tmp_path / "o", "--quiet", "--skip-unstable").exit_code == 0


@pytest.mark.parametrize("last", ["0", "-1"])
def test_recover_last_must_be_positive(tmp_path, last):
    run_dir = _run_dir(tmp_path)
    assert_refused(run("recover", run_dir, tmp_path / "o", "--last", last), "last")


# -- 3. one line, exit code 2, never a traceback or a hang ---------------------------------------------


def test_yaml_alias_bomb_is_refused_at_once(pair, tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    recipe = tmp_path / "bomb.yml"
    recipe.write_text("\n".join(lines) + "\nmerge_method: *a8\nmodels: []\n")
    assert_refused(run("merge", recipe, tmp_path / "o", "--quiet"), "more than")


def test_huge_and_deep_recipes_are_refused_at_once(tmp_path):
    big = tmp_path / "big.yml"
    big.write_text("merge_method: linear\n# " + "x" * (2 * 1024 * 1024) + "\n")
    assert_refused(run("merge", big, tmp_path / "o"), "recipes are at most")
    deep = tmp_path / "deep.yml"
    deep.write_text("merge_method: " + "[" * 5000 + "]" * 5000 + "\n")
    assert_refused(run("merge", deep, tmp_path / "o"), "nested")


def test_non_utf8_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "latin1.yml"
    recipe.write_bytes("merge_method: linear # caf\xe9\n".encode("latin-1"))
    assert_refused(run("merge", recipe, tmp_path / "o"), "latin1.yml", "UTF-8")


@pytest.mark.parametrize("content", ["[1, 2, 3]", "{\"log_history\": 5}", "{\"log_history\": [{\"step\": \"x\", \"loss\": []}]}",
                                     "not json", "[" * 100000])
def test_malformed_trainer_state_is_named(tmp_path, content):
    run_dir = _run_dir(tmp_path)
    (run_dir / "trainer_state.json").write_text(content)
    assert_refused(run("recover", run_dir, tmp_path / "o"), "trainer_state.json")
    assert_refused(run("average", run_dir, tmp_path / "o2", "--skip-unstable", "--quiet"), "trainer_state.json")
    assert_refused(run("analyze", "noise-scale", "--trainer-state", run_dir / "trainer_state.json"),
                   "trainer_state.json")


def test_inspect_on_nan_tensors_and_missing_json_folder(pair, tmp_path):
    a, b, _ = pair
    t = load_file(str(b / "model.safetensors"))
    t["w"][0, 0] = float("nan")
    save_file(t, str(b / "model.safetensors"))
    assert_refused(run("inspect", a, b), "tensor w", str(b), "NaN")


def test_bad_device_is_one_line(pair, tmp_path):
    assert_refused(run("merge", pair[2], tmp_path / "o", "--device", "bogus", "--quiet"), "bogus")


def test_stats_on_a_missing_local_path_never_touches_the_network(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("hello world\n")
    assert_refused(run("stats", "gram", tmp_path / "no-such-model", data, tmp_path / "g.safetensors"),
                   "does not exist")


def test_unsafe_pickle_in_stats_gram_is_one_line(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = tmp_path / "m"
    folder.mkdir()
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    data = tmp_path / "d.txt"
    data.write_text("hello world\n")
    # In a subprocess: transformers' logging keeps a handle on the first stream it saw.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mergelab.cli", "stats", "gram", str(folder), str(data),
                           str(tmp_path / "g.safetensors")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "refused to load" in proc.stderr and "weights_only" in proc.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "g.safetensors").exists()


def test_evaluator_calling_sys_exit_is_a_failure(tmp_path):
    from mergelab.analysis.evaluators import evaluate
    from mergelab.errors import MergeError

    def quits(model):
        raise SystemExit(0)

    with pytest.raises(MergeError, match="sys.exit"):
        evaluate(quits, torch.nn.Linear(1, 1), "alpha=0")


def test_unexpected_exceptions_keep_their_traceback_and_ask_for_a_report(tmp_path, monkeypatch, capsys):
    import mergelab.cli.main as cli

    def boom(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "bug in mergelab" in err


def test_finite_inputs_merged_into_inf_are_refused(pair, tmp_path):
    a, b, _ = pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "out_dtype": "float16",
                                      "parameters": {"normalize": False}, "models": [
        {"model": str(a), "parameters": {"weight": 1e6}}, {"model": str(b), "parameters": {"weight": 1e6}}]}))
    assert_refused(run("merge", recipe, tmp_path / "o", "--quiet"), "came out NaN or Inf from finite inputs")
    assert not (tmp_path / "o").exists()
