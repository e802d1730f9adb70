"""Adapter merges through the engine (lora/adapter_run.py) against the in-memory merge (merge_lora_layers on
the adapters read whole): the same tensors bit for bit, on every method/combine/align path; planned from
names and shapes alone; the engine's opt-in to adapter files."""

from __future__ import annotations

import json

import pytest
import torch

from lora_kit import make_adapter, make_base
from mergelab.checkpoint.reader import Checkpoint
from mergelab.errors import CheckpointError, MergeError
from mergelab.lora.adapter_run import adapter_plan, merge_adapter_files
from mergelab.lora.api import close, merge_adapters, read_adapters
from mergelab.lora.merge import merge_lora_layers
from mergelab.lora.peft_format import read_adapter, write_adapter


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Adapters a (rank 3, every layer kind), b (rank 2, rsLoRA), c (rank 4, three modules), big (rank 9 >
    the layers' sides), a bf16 copy of a, and the base's state dict as one file."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("adapters")
    out = {"a": make_adapter(root / "a", seed=1, r=3, alpha=5.0),
           "b": make_adapter(root / "b", seed=2, r=2, alpha=3.0, rslora=True),
           "c": make_adapter(root / "c", seed=3, r=4, alpha=4.0, targets=["q", "v", "g"]),
           "big": make_adapter(root / "big", seed=4, r=9, alpha=4.0, targets=["q", "v", "c1"])}
    make_adapter(root / "a16", seed=1, r=3, alpha=5.0)
    t = load_file(str(root / "a16" / "adapter_model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(root / "a16" / "adapter_model.safetensors"))
    out["a16"] = root / "a16"
    out["base"] = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in make_base().state_dict().items()}, str(out["base"]))
    return out


CASES = {  # name: (adapters, base?, method, options)
    "cat_linear": ("abc", False, "linear", dict(combine="cat", weight=[0.5, 0.3, 0.2])),
    "cat_negative": ("ab", False, "task_arithmetic", dict(combine="cat", weight=[0.7, -0.5])),
    "svd_rank1": ("abc", False, "task_arithmetic", dict(rank=1, weight=[0.6, 0.9, 0.2])),
    "svd_rank_above_total": ("abc", False, "task_arithmetic", dict(rank=50, weight=1.0)),
    "ties": ("abc", False, "ties", dict(rank=8, weight=[0.6, 0.4, 0.3], density=0.5)),
    "dare_seeded": ("abc", False, "dare_ties", dict(rank=4, weight=1.0, density=0.5, seed=7)),
    "dare_unseeded": ("ab", False, "dare_linear", dict(rank=40, weight=1.0, density=0.5)),
    "breadcrumbs": ("ab", False, "breadcrumbs", dict(rank=6, weight=[0.7, 1.3], density=0.5, gamma=0.0)),
    "knots_linear": ("abc", False, "task_arithmetic", dict(rank=5, align="knots", weight=[0.6, -0.4, 0.1])),
    "knots_ties": ("ab", False, "ties", dict(rank=8, align="knots", weight=1.0, density=0.5)),
    "big_rank_cat": (["a", "big"], True, "linear", dict(combine="cat", weight=1.0)),
    "big_rank_svd": (["a", "big"], True, "linear", dict(rank=20, weight=1.0)),
    "big_rank_knots": (["a", "big"], True, "dare_linear", dict(rank=30, align="knots", weight=1.0, density=0.5,
                                                              seed=3)),
    "bf16": (["a16", "b"], False, "ties", dict(rank=3, weight=0.5, density=0.7)),
}


def _reference(folders, names, base, method, options):
    """The in-memory merge: every adapter read whole, merged by merge_lora_layers."""
    shapes = None
    if base:
        with Checkpoint(folders["base"]) as ck:
            shapes = {n: ck.shape(n) for n in ck}
    return merge_lora_layers(method, [read_adapter(folders[n], shapes).layers for n in names], **options)


def _assert_same(got, want):
    (layers, reports), (ref_layers, ref_reports) = got, want
    assert reports == ref_reports and list(layers) == list(ref_layers)
    for module, layer in layers.items():
        ref = ref_layers[module]
        assert (layer.weight_shape, layer.layout, layer.embedding) == (ref.weight_shape, ref.layout, ref.embedding)
        assert layer.A.dtype == ref.A.dtype == torch.float32 and layer.B.dtype == torch.float32
        assert torch.equal(layer.A, ref.A) and torch.equal(layer.B, ref.B), module


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_merge_is_bit_identical_to_the_in_memory_merge(folders, case):
    names, base, method, options = CASES[case]
    specs = read_adapters([str(folders[n]) for n in names], str(folders["base"]) if base else None)
    try:
        keys = {"combine": "svd", "rank": None, "seed": None, "align": None}
        plan, _ = adapter_plan(specs, method, **{k: options.get(k, v) for k, v in keys.items()}, params_for=None,
                               params={k: v for k, v in options.items() if k not in keys}, facts={})
        got = merge_adapter_files(specs, method, **options)
    finally:
        close(specs)
    _assert_same(got, _reference(folders, names, base, method, options))
    declared = {info.name: tuple(info.shape) for info in plan.layout}  # outputs planned from shapes alone
    made = {f"{m}:{w}": tuple(getattr(layer, w).shape) for m, layer in got[0].items() for w in "AB"}
    assert declared == made and all(job.op == "factorize" for job in plan.jobs)


def test_per_module_parameters_and_seed_as_in_memory(folders):
    """params_for (a recipe's per-module parameters) and the seed reach each module's merge unchanged."""
    def params_for(module, idx):
        return {"weight": [0.3 + 0.1 * i + 0.05 * len(module) for i in idx], "density": 0.4 if module < "g" else 0.8}

    names = "abc"
    specs = read_adapters([str(folders[n]) for n in names], None)
    try:
        got = merge_adapter_files(specs, "dare_ties", rank=3, seed=5, params_for=params_for)
    finally:
        close(specs)
    _assert_same(got, _reference(folders, names, False, "dare_ties", dict(rank=3, seed=5, params_for=params_for)))


def test_the_written_adapter_is_the_reference_written(folders, tmp_path):
    names = [str(folders[n]) for n in "abc"]
    report = merge_adapters(names, tmp_path / "m", method="ties", rank=4, weight=[0.5, 0.3, 0.9], density=0.6)
    layers, reports = _reference(folders, "abc", False, "ties", dict(rank=4, weight=[0.5, 0.3, 0.9], density=0.6))
    write_adapter(tmp_path / "ref", layers, base_model=None)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "m" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()
    assert report.layers == reports and report.tensors == 2 * len(layers)


def test_planning_reads_no_factor(folders, monkeypatch, tmp_path):
    """Every check and the whole plan come from names and shapes: no tensor is read before the run."""
    def no_read(self, name, *a):
        raise AssertionError(f"read {name} while planning")

    monkeypatch.setattr(Checkpoint, "__getitem__", no_read)
    monkeypatch.setattr(Checkpoint, "view", no_read)
    specs = read_adapters([str(folders[n]) for n in "abc"], None)
    try:
        plan, modules = adapter_plan(specs, "ties", combine="svd", rank=2, seed=None, align=None,
                                     params={"weight": 1.0, "density": 0.5}, params_for=None, facts={})
        assert [m for m, _, _ in modules] == sorted({m for s in specs for m in s.factors})
        with pytest.raises(MergeError, match="module c1: `combine: cat` is exact only"):
            adapter_plan(specs, "ties", combine="cat", rank=None, seed=None, align=None,
                         params={"weight": 1.0, "density": 0.5}, params_for=None, facts={})
        with pytest.raises(MergeError, match="parameter 'weight' has 2 values for 3 adapters"):
            adapter_plan(specs, "linear", combine="cat", rank=None, seed=None, align=None,
                         params={"weight": [1.0, 2.0]}, params_for=None, facts={})
    finally:
        close(specs)
    with pytest.raises(MergeError, match="combine: cat"):  # refused before the first factor is read
        merge_adapters([str(folders["a"]), str(folders["b"])], tmp_path / "x", method="ties", combine="cat",
                       weight=1.0, density=0.5)
    assert not (tmp_path / "x").exists()


def test_checkpoint_reads_adapters_only_when_asked(folders, tmp_path):
    """Checkpoint refuses an adapter (it would merge A and B as weights: a wrong model); adapter=True, the
    adapter merge's opt-in, maps its adapter_model file, and takes nothing but an adapter folder."""
    with pytest.raises(CheckpointError, match="is a LoRA/PEFT adapter"):
        Checkpoint(folders["a"])
    with Checkpoint(folders["a"], adapter=True) as ck:
        name = "base_model.model.q.lora_A.weight"
        assert name in ck and ck.shape(name) == (3, 6) and ck.folder == folders["a"]
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        Checkpoint(folders["base"], adapter=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(CheckpointError, match="the adapter is incomplete"):
        Checkpoint(empty, adapter=True)
