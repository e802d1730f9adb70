"""Models named by Hub id: found in a Hugging Face cache laid out on disk by the tests, never online.

The cache is built the way huggingface_hub writes it: blobs/<sha>, snapshots/<commit>/<file> as
links to the blobs, refs/<branch> holding a commit hash. Downloads are replaced by a fake that
records what was asked for, so nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.checkpoint import hub
from mergelab.errors import RecipeError

hf = pytest.importorskip("huggingface_hub")

COMMIT_MAIN = "a" * 40
COMMIT_DEV = "b" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], branch: str | None = "main") -> Path:
    """Write `files` as one snapshot of `repo_id` in the cache layout; point `branch` at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    if branch:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return snap


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def tiny_model(value: float) -> dict[str, bytes]:
    """A two-tensor model folder whose weights are all `value`, as file name -> bytes."""
    import io
    import json

    from safetensors.torch import save

    weights = {"layer.weight": torch.full((3, 4), value), "layer.bias": torch.full((3,), value)}
    config = {"architectures": ["TinyNet"], "model_type": "tiny"}
    return {"model.safetensors": save(weights), "config.json": json.dumps(config).encode(),
            "tokenizer_config.json": io.BytesIO(b"{}").getvalue()}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return root


def merged(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors")) if (out / "model.safetensors").exists() else {
        k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_recipe_names_models_by_hub_id_and_merges_them_from_the_cache(cache, tmp_path):
    add_snapshot(cache, "org/one", COMMIT_MAIN, tiny_model(1.0))
    add_snapshot(cache, "org/two", COMMIT_MAIN, tiny_model(4.0))
    recipe = ("merge_method: linear\nmodels:\n  - model: org/one\n    parameters: {weight: 3}\n"
              "  - model: org/two\n    parameters: {weight: 1}\n")
    mergelab.merge(recipe, tmp_path / "out")
    got = merged(tmp_path / "out")
    # (3 * 1 + 1 * 4) / 4 = 1.75, worked by hand
    torch.testing.assert_close(got["layer.weight"], torch.full((3, 4), 1.75))
    torch.testing.assert_close(got["layer.bias"], torch.full((3,), 1.75))


def test_revision_by_branch_and_by_commit_hash(cache):
    add_snapshot(cache, "org/one", COMMIT_MAIN, tiny_model(1.0), branch="main")
    add_snapshot(cache, "org/one", COMMIT_DEV, tiny_model(2.0), branch="dev")
    main = hub.resolve_hub_model("org/one")
    dev = hub.resolve_hub_model("org/one@dev")
    by_hash = hub.resolve_hub_model(f"org/one@{COMMIT_DEV}")
    assert Path(main).name == COMMIT_MAIN
    assert Path(dev).name == COMMIT_DEV and Path(by_hash).name == COMMIT_DEV
    assert load_file(str(Path(dev) / "model.safetensors"))["layer.bias"][0] == 2.0
    assert hub.resolve_hub_model("org/one@main") == main


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = add_snapshot(tmp_path / "home" / "hub", "org/one", COMMIT_MAIN, tiny_model(1.0))
    assert hub.hub_cache_dir() == tmp_path / "home" / "hub"
    assert Path(hub.resolve_hub_model("org/one")) == snap


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(cache, tmp_path):
    add_snapshot(cache, "org/one", COMMIT_MAIN, tiny_model(1.0))
    local = tmp_path / "org" / "one"
    local.mkdir(parents=True)
    for name, data in tiny_model(7.0).items():
        (local / name).write_bytes(data)
    rec = mergelab.recipe.load_recipe("merge_method: linear\nmodels:\n  - model: org/one\n"
                                      "    parameters: {weight: 1}\n")
    assert Path(rec.resolve("org/one")) == local


def test_offline_miss_names_the_model_and_how_to_get_it(cache):
    with pytest.raises(RecipeError) as err:
        mergelab.recipe.resolve(mergelab.recipe.load_recipe(
            "merge_method: ties\nbase_model: org/absent@v2\nmodels:\n  - model: org/absent@v2\n"
            "  - model: org/other\n    parameters: {weight: 1, density: 0.5}\n"))
    problems = err.value.problems
    assert len(problems) == 2, problems  # one line per missing model, not one per mention
    assert problems[0].startswith("base_model: 'org/absent@v2' is no local path, and as a Hub model it is not "
                                  "in the local cache")
    assert "hf download org/absent --revision v2" in problems[0]
    assert problems[1].startswith("models[1].model: 'org/other' is no local path, and as a Hub model it is not "
                                  "in the local cache")


def test_no_download_starts_for_a_recipe_with_other_problems(cache, monkeypatch):
    asked = fake_hub(monkeypatch, cache, REPO_FILES)
    with pytest.raises(RecipeError, match="unknown method"):
        mergelab.recipe.load_recipe("merge_method: linnear\nmodels:\n  - model: org/big\n")
    assert asked == []


def test_offline_flag_overrides_an_online_environment(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    called = []
    monkeypatch.setattr(hf, "list_repo_files", lambda *a, **k: called.append(a) or [])
    with pytest.raises(Exception, match=r"offline.*offline=False") as exc:
        hub.resolve_hub_model("org/absent", offline=True)
    assert exc.value.option == "offline"
    assert not called


def test_a_snapshot_without_weights_is_not_taken_for_the_model(cache):
    add_snapshot(cache, "org/partial", COMMIT_MAIN, {"config.json": b"{}"})
    with pytest.raises(Exception, match="org/partial.*not in the local cache"):
        hub.resolve_hub_model("org/partial")


def test_a_snapshot_missing_a_shard_its_index_names_is_not_taken_for_the_model(cache):
    import json

    files = {"config.json": b"{}", "model-00001-of-00002.safetensors": tiny_model(1.0)["model.safetensors"],
             "model.safetensors.index.json": json.dumps({"weight_map": {
                 "layer.weight": "model-00001-of-00002.safetensors",
                 "layer.bias": "model-00002-of-00002.safetensors"}}).encode()}
    add_snapshot(cache, "org/interrupted", COMMIT_MAIN, files)
    with pytest.raises(Exception, match="org/interrupted.*not in the local cache"):
        hub.resolve_hub_model("org/interrupted")


REPO_FILES = ["README.md", ".gitattributes", "config.json", "generation_config.json",
              "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
              "pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "training_args.bin", "optimizer.pt", "original/consolidated.00.pth",
              "onnx/model.onnx", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json"]


def fake_hub(monkeypatch, cache: Path, files: list[str]):
    """Replace the Hub with `files`: listing answers them, a download writes what the patterns select."""
    from huggingface_hub.utils import filter_repo_objects

    asked = []
    real = hf.snapshot_download

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None,
                          **kwargs):
        if local_files_only:  # reading the cache needs no network: the real function does it
            return real(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        asked.append(allow_patterns)
        chosen = list(filter_repo_objects(files, allow_patterns=allow_patterns))
        content = {f: tiny_model(5.0)["model.safetensors"] if f.endswith(".safetensors") else b"{}" for f in chosen}
        return str(add_snapshot(Path(cache_dir), repo_id, COMMIT_MAIN, content))

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf, "list_repo_files", lambda repo_id, revision=None, **k: list(files))
    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    return asked


def test_download_asks_only_for_what_a_merge_reads(cache, monkeypatch):
    asked = fake_hub(monkeypatch, cache, REPO_FILES)
    folder = Path(hub.resolve_hub_model("org/big"))
    assert len(asked) == 1
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == sorted(["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                          "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "modules.json",
                          "1_Pooling/config.json", "sentence_bert_config.json"])
    # a second resolution finds it in the cache and downloads nothing
    assert Path(hub.resolve_hub_model("org/big")) == folder and len(asked) == 1


def test_download_takes_bin_weights_when_the_repo_has_no_safetensors(cache, monkeypatch):
    files = [f for f in REPO_FILES if "safetensors" not in f]
    asked = fake_hub(monkeypatch, cache, files)
    folder = Path(hub.resolve_hub_model("org/old"))
    assert (folder / "pytorch_model.bin").exists()
    from huggingface_hub.utils import filter_repo_objects

    chosen = set(filter_repo_objects(files, allow_patterns=asked[0]))
    assert {"pytorch_model.bin", "pytorch_model.bin.index.json", "config.json"} <= chosen
    assert not chosen & {"training_args.bin", "optimizer.pt", "original/consolidated.00.pth", "onnx/model.onnx"}


def test_gated_model_says_to_set_hf_token(cache, monkeypatch):
    fake_hub(monkeypatch, cache, [])

    def gated(*a, **k):
        err = hf.errors.GatedRepoError.__new__(hf.errors.GatedRepoError)  # as the Hub's 403 answer is turned into
        Exception.__init__(err, "403 Client Error: access to model meta/llama is restricted")
        raise err

    monkeypatch.setattr(hf, "list_repo_files", gated)
    with pytest.raises(Exception, match="gated.*HF_TOKEN"):
        hub.resolve_hub_model("meta/llama")


@pytest.mark.parametrize("ref, parsed", [
    ("org/name", ("org/name", None)), ("org/name@dev", ("org/name", "dev")),
    (f"org/na.me-1@{COMMIT_DEV}", ("org/na.me-1", COMMIT_DEV)),
    ("./org/name", None), ("/abs/path", None), ("name", None), ("a/b/c", None), ("org/name@", None),
    ("recipes/merge.yml", None), ("~/models/x", None), ("org/a+org/lora", None),
])
def test_parse_hub_reference(ref, parsed):
    got = hub.parse_hub_reference(ref)
    assert (got.repo_id, got.revision) == parsed if parsed else got is None


def test_cli_offline_flag_gives_one_line_and_exit_2(cache, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mergelab.cli.main import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the flag alone makes it offline
    asked = fake_hub(monkeypatch, cache, REPO_FILES)
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: org/nowhere\n    parameters: {weight: 1}\n")
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--offline"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "org/nowhere" in lines[0] and "hf download org/nowhere" in lines[0], result.output
    assert asked == []


def test_load_recipe_leaves_hub_ids_to_resolve(cache, monkeypatch):
    snap = add_snapshot(cache, "org/one", COMMIT_MAIN, tiny_model(1.0))
    looked_up = []
    real = hub.resolve_hub_model
    stage = importlib.import_module("mergelab.recipe.resolve")  # the module; mergelab.recipe.resolve is the function
    monkeypatch.setattr(stage, "resolve_hub_model", lambda ref, **kw: looked_up.append(ref) or real(ref, **kw))
    rec = mergelab.recipe.load_recipe("merge_method: linear\nmodels:\n  - model: org/one\n"
                                      "    parameters: {weight: 1}\n")
    assert looked_up == [] and rec.resolve("org/one") == "org/one"  # parsing and validation only
    resolved = mergelab.recipe.resolve(rec)
    assert looked_up == ["org/one"]
    assert Path(resolved.recipe.resolve("org/one")) == snap and rec.resolve("org/one") == "org/one"
    assert list(resolved.inputs) == [resolved.recipe.resolve("org/one")]
    assert resolved.recipe.to_yaml() == rec.to_yaml()  # the references as written
