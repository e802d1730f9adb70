"""tall_masks: hand-worked masks and consensus, the merge's side files, every task rebuilt."""

from __future__ import annotations

import json

import pytest
import torch

import mergelab
from mergelab.checkpoint.side_outputs import SIDE_META, SIDE_TENSORS, read_side
from mergelab.checkpoint.tensor_file import load_tensors
from mergelab.errors import NonFiniteError
from mergelab.methods import PerModel, get_method
from mergelab.methods.registry import NoParams
from mergelab.methods.tall_masks import TALL_SIDE, TallMasksShared
from task_model_folders import recipe, save_folders, tiny_state_dicts

# tau_MTL = [4.5, 1, 1.5]; with lambda 1: mask_0 = [T, T, F], mask_1 = [F, F, F], mask_2 = [F, T, F]
TAU = torch.tensor([[3.0, 1.0, 0.5], [1.0, -1.0, 0.5], [0.5, 1.0, 0.5]])
BASE = torch.tensor([1.0, 2.0, 3.0])


def merge(k: int, scale: float = 1.0, lam: float = 1.0):
    s = TallMasksShared(tall_mask_lambda=lam, prun_thre_k=k, **{"lambda": scale})
    x = TAU + BASE
    merged = get_method("tall_masks").fn(x, BASE, PerModel([NoParams()] * 3), s)
    return merged, TALL_SIDE.tensor_fn(x, BASE, None, s, merged), s


@pytest.mark.parametrize("k,want", [(2, [0.0, 1.0, 0.0]), (1, [4.5, 1.0, 0.0]), (0, [4.5, 1.0, 1.5]),
                                    (4, [0.0, 0.0, 0.0])])
def test_hand_worked_consensus(k, want):
    merged, side, _ = merge(k)
    assert torch.allclose(merged, BASE + torch.tensor(want))


@pytest.mark.parametrize("k,scale", [(2, 1.0), (2, 0.5), (1, 0.3), (0, 2.0), (4, 1.0)])
def test_each_task_rebuilt_from_the_merged_tensor(k, scale):
    merged, side, s = merge(k, scale)
    info = {"params": s.model_dump(by_alias=True), "summary": {}}
    want = [[4.5, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    for t in range(3):
        got = TALL_SIDE.rebuild_fn(merged, BASE, side, info, t)
        assert torch.allclose(got, BASE + torch.tensor(want[t]), atol=1e-6), (k, scale, t)
    lost = {2: [4.5], 1: [], 0: [], 4: [4.5, 1.0]}[k]  # tau_MTL where some mask is set, the consensus not
    assert side["rest"].tolist() == lost


def test_lambda_zero_keeps_every_changed_entry():
    merged, side, s = merge(3, lam=0.0)  # |tau_t| > 0: every task masks all its nonzero entries
    assert torch.allclose(merged, BASE + TAU.sum(0))


def test_merge_writes_side_files_and_every_task_rebuilds(tmp_path):
    base, fts = tiny_state_dicts(4, seed=5)
    pb, pf = save_folders(tmp_path / "in", base, fts)
    out = tmp_path / "tall"
    mergelab.merge(recipe("tall_masks", pb, pf, tall_mask_lambda=0.5, **{"lambda": 0.8}), out)
    meta = json.loads((out / SIDE_META).read_text())
    assert meta["method"] == "tall_masks" and [t["name"] for t in meta["tasks"]] == [f"task{i}" for i in range(4)]
    assert meta["base"]["path"] == pb and meta["tensors"]["l0.weight"]["tall_mask_lambda"] == 0.5
    side, _ = read_side(out)
    assert side["l0.weight"]["masks"].shape == (4, 16)  # 128 entries, 8 to a byte
    assert (out / SIDE_TENSORS).stat().st_size < 4096
    merged = load_tensors(out / "model.safetensors")
    for k in base:  # a second formula: the paper's definitions one task at a time
        taus = [ft[k] - base[k] for ft in fts]
        mtl = sum(taus)
        masks = [t.abs() > 0.5 * (mtl - t).abs() for t in taus]
        count = sum(m.int() for m in masks)
        assert torch.allclose(merged[k], base[k] + 0.8 * mtl * (count >= 2), atol=1e-6)
        for t in range(4):
            got = mergelab.task_model(out, f"task{t}")[k]
            assert torch.allclose(got, base[k] + mtl * masks[t], atol=1e-6), (k, t)


def test_a_failing_run_leaves_no_output_folder(tmp_path):
    base, fts = tiny_state_dicts(2, seed=6)
    fts[0]["l0.weight"][1, 1] = float("inf")
    pb, pf = save_folders(tmp_path / "in", base, fts)
    with pytest.raises(NonFiniteError):
        mergelab.merge(recipe("tall_masks", pb, pf), tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["in"]
