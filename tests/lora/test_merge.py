"""Adapter merges against PEFT (the reference) and against float64 formulas written out here."""

from __future__ import annotations

import pytest
import torch

from lora_kit import LINEAR_TARGETS, ids, make_adapter, make_base, peft_delta  # noqa: F401 (ids: a fixture)
from mergelab.errors import CheckpointError, MergeError
from mergelab.lora.api import merge_adapters, read_adapters
from mergelab.lora.peft_format import read_adapter

ALL = ["q", "v", "c1", "c2", "g", "emb"]


def _shapes():
    return {k: tuple(v.shape) for k, v in make_base().state_dict().items()}


@pytest.fixture
def two(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, r=3, alpha=5.0)
    b = make_adapter(tmp_path / "b", seed=2, r=2, alpha=3.0, rslora=True)
    return a, b


def _peft_with(adapters):
    from peft import PeftModel

    model = PeftModel.from_pretrained(make_base(), str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    return model


def _written_delta(folder, module):
    return peft_delta(folder, module)  # PEFT's own reading of the adapter mergelab wrote


def test_read_matches_peft_every_layer_kind(two):
    """s_i B_i A_i read by mergelab equals PEFT's get_delta_weight, rsLoRA scaling included."""
    for folder in two:
        ad = read_adapter(folder, _shapes())
        assert sorted(ad.layers) == sorted(ALL)
        for module, layer in ad.layers.items():
            torch.testing.assert_close(layer.delta().double(), peft_delta(folder, module), atol=1e-6, rtol=1e-5)


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path):
    folder = make_adapter(tmp_path / "r", seed=3, r=4, alpha=6.0, targets=["q"], rslora=True)
    from safetensors.torch import load_file

    t = {k.split(".")[-2]: v.double() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    hand = 6.0 / 4 ** 0.5 * t["lora_B"] @ t["lora_A"]
    torch.testing.assert_close(read_adapter(folder).layers["q"].delta().double(), hand, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("weights", [(0.7, 0.5), (0.8, -0.6)])
def test_cat_is_exact_and_matches_peft_cat(two, tmp_path, weights):
    out = tmp_path / "cat"
    merge_adapters([str(p) for p in two], out, method="task_arithmetic", combine="cat", weight=list(weights))
    model = _peft_with(two)
    model.add_weighted_adapter(["a0", "a1"], list(weights), "cat", combination_type="cat")
    for module in ALL:
        hand = sum(w * peft_delta(p, module) for w, p in zip(weights, two))  # sum_i w_i s_i B_i A_i
        mine = _written_delta(out, module)
        torch.testing.assert_close(mine, hand, atol=1e-5, rtol=1e-5)
        target = model.base_model.model.get_submodule(module)
        torch.testing.assert_close(mine, target.get_delta_weight("cat").double(), atol=1e-5, rtol=1e-5)
    cfg = read_adapter(out).layers
    assert cfg["q"].rank == 5  # rank of cat = sum of ranks


def test_negative_weights_where_peft_linear_is_wrong(two, tmp_path):
    """PEFT's `linear` combines A and B separately (sqrt of weights): not w1 dW1 + w2 dW2 (peft#3004)."""
    weights = [1.0, -1.0]
    out = tmp_path / "lin"
    # PEFT's linear needs equal ranks: use two rank-3 adapters.
    a = make_adapter(tmp_path / "la", seed=4, r=3, alpha=3.0, targets=LINEAR_TARGETS)
    b = make_adapter(tmp_path / "lb", seed=5, r=3, alpha=3.0, targets=LINEAR_TARGETS)
    merge_adapters([str(a), str(b)], out, method="linear", rank=6, weight=weights, normalize=False)
    model = _peft_with([a, b])
    model.add_weighted_adapter(["a0", "a1"], weights, "lin", combination_type="linear")
    hand = peft_delta(a, "q") - peft_delta(b, "q")
    torch.testing.assert_close(_written_delta(out, "q"), hand, atol=1e-5, rtol=1e-5)
    peft_q = model.base_model.model.get_submodule("q").get_delta_weight("lin").double()
    assert (peft_q - hand).abs().max() > 1e-2  # PEFT's answer is a different matrix


@pytest.mark.parametrize("rank", [1, 3])
def test_svd_rank_r_is_the_eckart_young_truncation(two, tmp_path, rank):
    weights = [0.6, 0.9]
    out = tmp_path / "svd"
    merge_adapters([str(p) for p in two], out, method="task_arithmetic", rank=rank, weight=weights)
    for module in ALL:
        dense = sum(w * peft_delta(p, module) for w, p in zip(weights, two))
        m2 = dense.T if module in ("g", "emb") else dense.reshape(dense.shape[0], -1)
        u, s, vh = torch.linalg.svd(m2)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        best = best.T if module in ("g", "emb") else best.reshape(dense.shape)
        torch.testing.assert_close(_written_delta(out, module), best, atol=1e-5, rtol=1e-5)


def test_svd_matches_peft_svd_on_linear_layers(tmp_path):
    a = make_adapter(tmp_path / "la", seed=6, r=3, alpha=6.0, targets=["q", "v"])
    b = make_adapter(tmp_path / "lb", seed=7, r=3, alpha=6.0, targets=["q", "v"])
    weights = [0.5, 1.5]
    out = tmp_path / "svd"
    merge_adapters([str(a), str(b)], out, method="task_arithmetic", rank=2, weight=weights)
    model = _peft_with([a, b])
    model.add_weighted_adapter(["a0", "a1"], weights, "s", combination_type="svd", svd_rank=2)
    for module in ("q", "v"):
        ref = model.base_model.model.get_submodule(module).get_delta_weight("s").double()
        torch.testing.assert_close(_written_delta(out, module), ref, atol=1e-5, rtol=1e-4)


def test_peft_svd_fails_on_conv1d_mergelab_does_not(tmp_path):
    """PEFT's svd combination cannot take Conv1d layers (peft#3769); mergelab truncates them exactly."""
    two = [make_adapter(tmp_path / n, seed=s, r=3, alpha=5.0, targets=["c1"]) for n, s in (("a", 1), ("b", 2))]
    model = _peft_with(two)
    with pytest.raises(RuntimeError, match="size"):
        model.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "s", combination_type="svd", svd_rank=2)
    merge_adapters([str(p) for p in two], tmp_path / "ok", method="task_arithmetic", rank=2, weight=1.0)
    dense = (peft_delta(two[0], "c1") + peft_delta(two[1], "c1")).reshape(5, -1)
    u, s, vh = torch.linalg.svd(dense)
    best = ((u[:, :2] * s[:2]) @ vh[:2]).reshape(5, 6, 3)
    torch.testing.assert_close(_written_delta(tmp_path / "ok", "c1"), best, atol=1e-5, rtol=1e-5)


def test_written_adapter_forward_equals_base_plus_merged_update(two, tmp_path, ids):
    from peft import PeftModel

    weights = [0.6, 0.4]
    out = tmp_path / "m"
    merge_adapters([str(p) for p in two], out, method="task_arithmetic", combine="cat", weight=weights)
    merged = PeftModel.from_pretrained(make_base(), str(out)).eval()
    ref = make_base()
    with torch.no_grad():
        for module in ALL:
            w = ref.get_submodule(module).weight
            w += sum(wt * peft_delta(p, module) for wt, p in zip(weights, two)).to(w.dtype)
        torch.testing.assert_close(merged(ids), ref(ids), atol=1e-5, rtol=1e-5)


def test_ties_dense_path_against_merge_tensors_on_peft_deltas(two, tmp_path):
    """Non-linear methods form each layer's dense update; rank = full rank reproduces it exactly."""
    import mergelab

    out = tmp_path / "ties"
    merge_adapters([str(p) for p in two], out, method="ties", rank=8, weight=[0.6, 0.4], density=0.5)
    d = [peft_delta(p, "q").float() for p in two]
    ref = mergelab.merge_tensors("ties", d, base=torch.zeros_like(d[0]), weight=[0.6, 0.4], density=0.5)
    torch.testing.assert_close(_written_delta(out, "q"), ref.double(), atol=1e-5, rtol=1e-5)


def test_union_of_target_modules(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, r=2, alpha=2.0, targets=["q"])
    b = make_adapter(tmp_path / "b", seed=2, r=2, alpha=2.0, targets=["q", "v"])
    report = merge_adapters([str(a), str(b)], tmp_path / "u", method="task_arithmetic", combine="cat", weight=1.0)
    torch.testing.assert_close(_written_delta(tmp_path / "u", "v"), peft_delta(b, "v"), atol=1e-6, rtol=1e-6)
    assert any("v is adapted by 1 of 2" in n for n in report.notes)


def test_cat_with_nonlinear_method_is_refused(two, tmp_path):
    with pytest.raises(MergeError, match="combine: cat"):
        merge_adapters([str(p) for p in two], tmp_path / "x", method="ties", combine="cat", weight=1.0, density=0.5)
    assert not (tmp_path / "x").exists()


def test_bad_adapters_are_refused_in_one_line_each(two, tmp_path):
    import json

    dora = make_adapter(tmp_path / "dora", seed=3, r=2, alpha=2.0, targets=["q"], use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        read_adapters([str(dora)], None)
    other = tmp_path / "other"
    make_adapter(other, seed=3, r=2, alpha=2.0, targets=["q"])
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/another-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    first = tmp_path / "first"
    make_adapter(first, seed=4, r=2, alpha=2.0, targets=["q"])
    cfg["base_model_name_or_path"] = "org/tiny-model"
    (first / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="different base models"):
        merge_adapters([str(first), str(other)], tmp_path / "o", method="task_arithmetic", rank=2, weight=1.0)
    assert not (tmp_path / "o").exists()
    (other / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="not a PEFT adapter"):
        read_adapters([str(other)], None)


def test_delta_rows_equal_rows_of_the_dense_update(two):
    """The engine merges big tensors in row blocks: every layout's row block must equal the dense rows."""
    for module, layer in read_adapter(two[0], _shapes()).layers.items():
        full = layer.delta()
        n = full.shape[0]
        for start, stop in ((0, 1), (1, n), (n // 2, n)):
            torch.testing.assert_close(layer.delta_rows(start, stop), full[start:stop])


@pytest.mark.parametrize("peft_kind, method, params", [
    ("ties_svd", "ties", {"weight": 1.0, "density": 0.5}),
    ("magnitude_prune_svd", "breadcrumbs", {"weight": [0.7, 1.3], "density": 0.5, "gamma": 0.0,
                                            "rescale": False, "normalize": False}),
])
def test_sparsified_merges_match_peft_where_they_mean_the_same(tmp_path, peft_kind, method, params):
    """PEFT's *_svd combinations sparsify the dense updates as mergelab does; at full rank they agree.

    (PEFT's ties divides by the count of agreeing entries, mergelab's by their summed weights:
    the same for unit weights. magnitude_prune is breadcrumbs without the outlier cut.)"""
    a = make_adapter(tmp_path / "a", seed=8, r=3, alpha=4.0, targets=["q", "v"])
    b = make_adapter(tmp_path / "b", seed=9, r=3, alpha=4.0, targets=["q", "v"])
    merge_adapters([str(a), str(b)], tmp_path / "m", method=method, rank=6, **params)
    weights = params["weight"] if isinstance(params["weight"], list) else [1.0, 1.0]
    model = _peft_with([a, b])
    model.add_weighted_adapter(["a0", "a1"], weights, "p", combination_type=peft_kind, svd_rank=6, density=0.5)
    for module in ("q", "v"):
        ref = model.base_model.model.get_submodule(module).get_delta_weight("p").double()
        torch.testing.assert_close(_written_delta(tmp_path / "m", module), ref, atol=1e-5, rtol=1e-4)


def test_knots_with_a_linear_method_is_the_plain_merge(two, tmp_path):
    merge_adapters([str(p) for p in two], tmp_path / "k", method="task_arithmetic", rank=5, align="knots",
                   weight=[0.6, -0.4])
    for module in ("q", "c2", "g"):
        hand = 0.6 * peft_delta(two[0], module) - 0.4 * peft_delta(two[1], module)
        torch.testing.assert_close(_written_delta(tmp_path / "k", module), hand, atol=1e-5, rtol=1e-5)


def test_knots_ties_against_a_dense_svd_of_the_concatenation(two, tmp_path):
    """Reference: SVD of [dW_1 | dW_2] in float64, TIES on the V_i^T blocks, mapped back by U S."""
    import mergelab

    merge_adapters([str(p) for p in two], tmp_path / "k", method="ties", rank=8, align="knots",
                   weight=1.0, density=0.5)
    d = [peft_delta(p, "q") for p in two]  # (8, 6) each, ranks 3 and 2
    u, s, vh = torch.linalg.svd(torch.cat(d, dim=1), full_matrices=False)
    k = int((s > 1e-5 * s[0]).sum())  # the K = 5 directions the updates span (float32 noise below)
    vts = [vh[:k, :6].float(), vh[:k, 6:].float()]
    merged = mergelab.merge_tensors("ties", vts, base=torch.zeros_like(vts[0]), weight=1.0, density=0.5)
    assert k == 5
    ref = (u[:, :k] * s[:k]) @ merged.double()
    torch.testing.assert_close(_written_delta(tmp_path / "k", "q"), ref, atol=1e-5, rtol=1e-4)


def test_adapter_for_a_module_the_base_lacks(two):
    shapes = {k: v for k, v in _shapes().items() if not k.startswith("c1.")}
    with pytest.raises(CheckpointError, match="adapts module c1, which the base model lacks"):
        read_adapter(two[0], shapes)


def test_adapter_outputs_follow_the_output_rules(two, tmp_path):
    """The adapter writer goes through checkpoint/output.py: never into an input, never over a folder
    mergelab did not write, even with overwrite; its own earlier output is replaced whole."""
    from mergelab.errors import OutputError

    adapters = [str(p) for p in two]
    before = (two[0] / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="input"):
        merge_adapters(adapters, two[0] / "merged", method="linear", combine="cat", weight=0.5, overwrite=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="did not write"):
        merge_adapters(adapters, theirs, method="linear", combine="cat", weight=0.5, overwrite=True)
    assert (theirs / "notes.txt").read_text() == "keep"
    out = tmp_path / "merged"
    merge_adapters(adapters, out, method="linear", combine="cat", weight=0.5)
    with pytest.raises(OutputError, match="already exists"):
        merge_adapters(adapters, out, method="linear", combine="cat", weight=0.5)
    merge_adapters(adapters, out, method="linear", combine="cat", weight=0.25, overwrite=True)
    assert (out / ".mergelab-output").is_file() and not list(tmp_path.glob(".merged.*"))
    assert (two[0] / "adapter_model.safetensors").read_bytes() == before
