"""emr: hand-worked election and rescalers, mask packing, the merge's side files, the task-model loader."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

import mergelab
from mergelab.checkpoint.side_outputs import SIDE_META, SIDE_TENSORS
from mergelab.checkpoint.tensor_file import load_tensors
from mergelab.errors import CheckpointError, MergeError, NonFiniteError
from mergelab.methods import PerModel, get_method
from mergelab.methods.bitmask import pack_masks, unpack_mask
from mergelab.methods.emr import EMR_SIDE
from mergelab.methods.registry import NoParams
from task_model_folders import recipe, save_folders, tiny_state_dicts

TAU = torch.tensor([[1.0, -2.0, 0.5, 0.0],
                    [3.0, 1.0, -1.0, 0.0],
                    [-2.0, -3.0, 0.0, 0.0]])


def run(x, base):
    spec = get_method("emr")
    return spec.fn(x, base, PerModel([NoParams()] * len(x)), NoParams())


def test_hand_worked_election():
    # sum = [2, -4, -0.5, 0] -> gamma = [+, -, -, -] (0 counts as -); agreeing maxima 3, 3, 1, none
    base = torch.full((4,), 10.0)
    assert torch.equal(run(TAU + base, base), base + torch.tensor([3.0, -3.0, -1.0, 0.0]))
    side = EMR_SIDE.tensor_fn(TAU + base, base, None, None, None)
    masks = torch.stack([unpack_mask(row, (4,)) for row in side["masks"]])
    assert masks.tolist() == [[True, True, False, False], [True, False, True, False], [False, True, False, False]]
    # mean|tau_i| = 0.875, 1.25, 1.25; mean|tau_uni * mask_i| = 1.5, 1.0, 0.75
    assert EMR_SIDE.summary_fn({"t": side}, None)["rescalers"] == pytest.approx([0.875 / 1.5, 1.25, 1.25 / 0.75])


def test_rescalers_are_one_global_ratio_over_tensors():
    a, b = TAU, 5 * TAU[:, :2]
    sides = {"a": EMR_SIDE.tensor_fn(a, torch.zeros(4), None, None, None),
             "b": EMR_SIDE.tensor_fn(b, torch.zeros(2), None, None, None)}
    got = EMR_SIDE.summary_fn(sides, None)["rescalers"]
    num = [float(a[i].abs().mean() + b[i].abs().mean()) for i in range(3)]
    den = [float(sides["a"]["abs_uni"][i] + sides["b"]["abs_uni"][i]) for i in range(3)]
    assert got == pytest.approx([n / d for n, d in zip(num, den)])
    ratios = [float(sides["a"]["abs_task"][0] / sides["a"]["abs_uni"][0]), float(sides["b"]["abs_task"][0]
                                                                                    / sides["b"]["abs_uni"][0])]
    assert got[0] != pytest.approx(sum(ratios) / 2)  # not a mean of per-tensor ratios


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 11)])
def test_mask_packing_round_trip(shape):
    masks = torch.rand((4, *shape), generator=torch.Generator().manual_seed(1)) > 0.5
    packed = pack_masks(masks)
    assert packed.dtype == torch.uint8 and packed.shape == (4, math.ceil(math.prod(shape) / 8))
    for row, mask in zip(packed, masks):
        assert torch.equal(unpack_mask(row, shape), mask)


@pytest.fixture()
def family(tmp_path):
    base, fts = tiny_state_dicts(3, seed=3)
    pb, pf = save_folders(tmp_path / "in", base, fts)
    out = tmp_path / "emr"
    mergelab.merge(recipe("emr", pb, pf), out)
    return base, fts, pb, pf, out


def test_merge_writes_side_files_and_every_task_rebuilds(family):
    base, fts, pb, pf, out = family
    assert (out / SIDE_TENSORS).is_file() and (out / SIDE_META).is_file()
    merged = load_tensors(out / "model.safetensors")
    taus = {k: torch.stack([ft[k] - base[k] for ft in fts]) for k in base}
    # a second formula: the paper's loops, entry by entry over tasks
    uni, masks = {}, {}
    for k, tau in taus.items():
        gamma = torch.where(tau.sum(0) > 0, 1.0, -1.0)
        masks[k] = [tau[i] * gamma > 0 for i in range(3)]
        best = torch.zeros_like(gamma)
        for i in range(3):
            best = torch.maximum(best, (tau[i] * masks[k][i]).abs())
        uni[k] = best * gamma
        assert torch.allclose(merged[k], base[k] + uni[k], atol=1e-6)
    for i in range(3):
        r = (sum(taus[k][i].abs().mean() for k in base) / sum((uni[k] * masks[k][i]).abs().mean() for k in base))
        got = mergelab.task_model(out, f"task{i}")
        for k in base:
            assert torch.allclose(got[k], base[k] + uni[k] * masks[k][i] * r, atol=1e-6), (i, k)
    assert sum(p.stat().st_size for p in out.glob("task_models.*")) < 4096


def test_loader_errors_name_the_file_and_task(family, tmp_path):
    base, fts, pb, pf, out = family
    with pytest.raises(MergeError, match=r"task_models\.json has no task 'nope'; its tasks are task0, task1, task2"):
        mergelab.task_model(out, "nope")
    with pytest.raises(CheckpointError, match=r"tensor l0\.bias is not the one the merge used"):
        mergelab.task_model(out, 0, base=pf[0])
    with pytest.raises(CheckpointError, match=r"the base model .*nowhere does not exist"):
        mergelab.task_model(out, 0, base=tmp_path / "nowhere")
    (out / SIDE_META).unlink()
    with pytest.raises(CheckpointError, match=r"task_models\.json is missing"):
        mergelab.task_model(out, 0)


def test_unmerge_command_writes_the_task_model(family, tmp_path):
    from mergelab.cli.main import app

    base, fts, pb, pf, out = family
    result = CliRunner().invoke(app, ["unmerge", str(out), str(tmp_path / "t1"), "--task", "task1", "-q"])
    assert result.exit_code == 0, result.output
    want = mergelab.task_model(out, 1)
    got = load_tensors(tmp_path / "t1" / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    bad = CliRunner().invoke(app, ["unmerge", str(out), str(tmp_path / "t2"), "--task", "0", "--base", pf[1]])
    assert bad.exit_code == 2 and "not the one the merge used" in bad.output and not (tmp_path / "t2").exists()


def test_a_failing_run_leaves_no_output_folder(tmp_path, monkeypatch):
    base, fts = tiny_state_dicts(2, seed=4)
    fts[1]["l1.bias"][0] = float("nan")
    pb, pf = save_folders(tmp_path / "in", base, fts)
    with pytest.raises(NonFiniteError):
        mergelab.merge(recipe("emr", pb, pf), tmp_path / "out")
    fts[1]["l1.bias"][0] = 0.0
    pb, pf = save_folders(tmp_path / "in2", base, fts)
    import mergelab.engine.side_files as side_module

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(side_module, "side_files", broken)
    with pytest.raises(OSError, match="disk full"):
        mergelab.merge(recipe("emr", pb, pf), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "in2"]
