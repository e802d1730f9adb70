"""Smoke tests of the benchmark harness (bench/): checkpoints, recipes, measuring, tables.

Nothing here asserts on timings; the numbers checked are shapes, bytes, memory
high-water marks and the arithmetic of the summary table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str, filename: str):
    # bench/ is scripts, not a package: load them under names that cannot clash.
    spec = importlib.util.spec_from_file_location(name, BENCH / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


mc = _load("make_checkpoints", "make_checkpoints.py")
bench_run = _load("bench_run", "run.py")

SMALL = mc.LlamaSpec(layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=128)


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return mc.make_family(tmp_path_factory.mktemp("family"), SMALL, shard_bytes=20_000, log=lambda _: None)


def test_plan_shards_hand_case():
    sizes = [("a", 3), ("b", 3), ("c", 3), ("d", 9), ("e", 1)]
    # a+b fill 6; c starts a new shard; d (over the limit) sits alone; e follows.
    assert mc.plan_shards(sizes, 6) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert mc.plan_shards([], 6) == []


def test_parse_size():
    assert mc.parse_size("1GB") == 10**9
    assert mc.parse_size("512MB") == 512 * 10**6
    assert mc.parse_size("2GiB") == 2 * 2**30
    assert mc.parse_size("1234") == 1234
    with pytest.raises(ValueError, match="byte count"):
        mc.parse_size("lots")


def test_shapes_and_config_match_transformers(family):
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(family["base"])
    reference = LlamaForCausalLM(config).state_dict()  # the independent source of names and shapes
    for name in mc.NAMES:
        tensors = read_folder(family[name])
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {
            k: tuple(v.shape) for k, v in reference.items()}
        assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    model, info = LlamaForCausalLM.from_pretrained(family["ft_a"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_sharding_and_index(family):
    for name in mc.NAMES:
        folder = family[name]
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted(f.name for f in folder.glob("*.safetensors"))
        assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
        total = 0
        for fname in files:
            with safe_open(folder / fname, "pt") as st:
                keys = set(st.keys())
                nbytes = sum(st.get_tensor(k).numel() * 2 for k in keys)
            assert keys == {k for k, v in index["weight_map"].items() if v == fname}
            assert nbytes <= 20_000 or len(keys) == 1
            total += nbytes
        assert index["metadata"]["total_size"] == total
        assert not folder.with_name(name + ".partial").exists()


def test_finetunes_are_base_plus_small_independent_deltas(family):
    base, a, b = (read_folder(family[n]) for n in mc.NAMES)
    key = "model.layers.0.mlp.up_proj.weight"
    da, db = (t[key].float() - base[key].float() for t in (a, b))
    assert da.std().item() == pytest.approx(1e-3, rel=0.1)
    assert base[key].float().std().item() == pytest.approx(mc.INIT_STD, rel=0.1)
    assert abs(torch.corrcoef(torch.stack([da.flatten(), db.flatten()]))[0, 1].item()) < 0.1


def test_generation_is_deterministic_and_reused(family, tmp_path):
    again = mc.write_checkpoint(tmp_path / "ft_a", SMALL, 0, shard_bytes=20_000)
    for f in sorted(family["ft_a"].glob("*.safetensors")):
        assert (again / f.name).read_bytes() == f.read_bytes()
    logged = []
    mc.make_family(family["base"].parent, SMALL, shard_bytes=20_000, log=logged.append)
    assert all(line.startswith("reusing") for line in logged) and len(logged) == 3


@pytest.mark.parametrize("method", list(bench_run.METHODS))
def test_recipes_are_valid_mergekit_configs(method, family):
    MergeConfiguration = pytest.importorskip("mergekit.config").MergeConfiguration

    recipe = bench_run.recipe_for(method, family)
    cfg = MergeConfiguration.model_validate(recipe)
    assert cfg.merge_method == method and cfg.dtype == "bfloat16"
    models = {str(m.model.model.path) for m in cfg.models}
    assert models == {str(family["ft_a"]), str(family["ft_b"])}
    if method == "slerp":
        assert cfg.parameters["t"] == 0.5
    elif method == "nearswap":
        assert cfg.parameters["t"] == 0.0001
    elif method not in ("sce", "model_stock", "karcher", "arcee_fusion"):  # these have no per-model weights
        assert all(m.parameters["weight"] == 0.5 for m in cfg.models)
    if bench_run.METHODS[method][0] == "base":
        assert str(cfg.base_model.model.path) == str(family["base"])
    elif method in ("nearswap", "arcee_fusion"):  # a base and one other model: the base is ft_a
        assert str(cfg.base_model.model.path) == str(family["ft_a"])
    if "density" in bench_run.TASK_VECTOR_PARAMS.get(method, {}):
        assert all(m.parameters["density"] == 0.5 for m in cfg.models)


def test_measure_sees_child_memory_and_exit_code(tmp_path):
    # The child holds 200 MB of touched anonymous memory for a while, then exits with 3.
    code = "import time, sys; b = bytearray(200 * 2**20); time.sleep(0.4); sys.exit(3)"
    rec = bench_run.measure([sys.executable, "-c", code], {}, tmp_path / "log")
    assert rec["rc"] == 3
    assert rec["max_rss_bytes"] >= 200 * 2**20
    assert rec["peak_anon_bytes"] >= 200 * 2**20


def test_io_floor_covers_inputs_and_cleans_up(family, tmp_path):
    floor = bench_run.io_floor(family, tmp_path, repeats=1)
    assert set(floor["read_s"]) == set(mc.NAMES)
    sizes = {n: sum(f.stat().st_size for f in family[n].glob("*.safetensors")) for n in mc.NAMES}
    assert floor["input_bytes"] == sizes and floor["output_bytes"] == sizes["base"]
    assert list(tmp_path.iterdir()) == []


def fake_records() -> list[dict]:
    def rec(tool, rep, wall, rss, rc=0):
        return {"method": "linear", "tool": tool, "repeat": rep, "wall_s": wall, "rc": rc,
                "max_rss_bytes": rss * 1e9, "peak_anon_bytes": rss * 5e8, "cmd": f"{tool} x.yml out",
                **({"error": "Traceback\nBoom: it broke"} if rc else {})}
    return [rec("mergekit", 0, 10.0, 3.0), rec("mergekit", 1, 30.0, 5.0), rec("mergekit", 2, 20.0, 4.0),
            rec("mergelab", 0, 5.0, 1.0), rec("mergelab", 1, 6.0, 2.0), rec("mergelab", 2, 99.0, 9.0, rc=1)]


FLOOR = {"read_s": {"base": 1.0, "ft_a": 1.0, "ft_b": 2.0}, "write_fsync_s": 1.0,
         "write_nofsync_s": 0.5, "output_bytes": 2 * 10**9, "input_bytes": {}}


def test_summary_medians_and_ratios():
    rows = bench_run.summarize(fake_records(), FLOOR, {"linear": ("ft_a", "ft_b")})
    mk, ml = rows
    # mergekit: median(10, 30, 20) = 20 s, median RSS 4 GB; floor 1 + 2 + 1 = 4 s.
    assert (mk["wall_s"], mk["max_rss_gb"], mk["floor_s"], mk["x_floor"]) == (20.0, 4.0, 4.0, 5.0)
    # mergelab: the failed run is left out: median(5, 6) = 5.5 s, median(1, 2) = 1.5 GB.
    assert (ml["runs"], ml["failed"], ml["wall_s"], ml["max_rss_gb"]) == (2, 1, 5.5, 1.5)
    assert ml["time_ratio"] == pytest.approx(20 / 5.5) and ml["rss_ratio"] == pytest.approx(4 / 1.5)
    assert mk["time_ratio"] is None and ml["x_floor"] == pytest.approx(5.5 / 4)


def test_results_files(tmp_path):
    records = fake_records()
    rows = bench_run.summarize(records, FLOOR, {"linear": ("ft_a", "ft_b")})
    args = argparse.Namespace(results_dir=tmp_path, size="tiny", repeats=3)
    result = bench_run.write_results(rows, records, FLOOR, args, SMALL)
    md = (tmp_path / "latest.md").read_text()
    assert "| " + " | ".join(bench_run.COLUMNS) + " |" in md
    assert "| linear | mergekit | 20.00 | 4.00 | 2.00 |  |  | 5.00 |" in md
    assert "| linear | mergelab | 5.50 (1 failed) | 1.50 | 0.75 | 3.64 | 2.67 | 1.38 |" in md
    assert "Boom: it broke" in md
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_args_rejects_bad_options():
    for argv in (["--methods", "linear,tiess"], ["--repeats", "0"], ["--skip-mergekit", "--skip-mergelab"]):
        with pytest.raises(SystemExit):
            bench_run.parse_args(argv)
    assert bench_run.parse_args(["--methods", "ties, slerp"]).methods == ["ties", "slerp"]
    assert bench_run.parse_args([]).methods == list(bench_run.DEFAULT_METHODS)
    assert set(bench_run.DEFAULT_METHODS) < set(bench_run.METHODS)


@pytest.mark.mergekit
def test_end_to_end_tiny_with_mergekit(tmp_path):
    pytest.importorskip("mergekit")
    result = bench_run.main(["--size", "tiny", "--methods", "linear", "--skip-mergelab",
                             "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "res")])
    (row,) = result["rows"]
    assert (row["tool"], row["runs"], row["failed"]) == ("mergekit", 1, 0)
    # Same tensors as an input checkpoint; only the safetensors headers differ in size.
    assert result["runs"][0]["out_bytes"] == pytest.approx(result["meta"]["floor"]["output_bytes"], rel=0.01)
    assert list((tmp_path / "work" / "outputs").iterdir()) == []  # outputs removed after the run
    assert (tmp_path / "res" / "latest.md").exists()
