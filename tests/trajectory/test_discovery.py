"""Finding and ordering the checkpoints of a run."""

import pytest
import torch
from safetensors.torch import save_file

from mergelab.errors import CheckpointError
from mergelab.trajectory.discovery import discover, select, step_of


def test_step_of_names():
    assert step_of("checkpoint-1000") == 1000
    assert step_of("step_1200.safetensors") == 1200
    assert step_of("epoch3-step900.bin") == 900
    assert step_of("ckpt_000300") == 300
    assert step_of("1000.pt") == 1000
    assert step_of("final.pt") is None


def test_trainer_folders_are_ordered_numerically(tmp_path):
    for step in (900, 1000, 50):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        save_file({"w": torch.zeros(1)}, str(d / "model.safetensors"))
    (tmp_path / "runs").mkdir()  # tensorboard logs are not checkpoints
    assert [c.step for c in discover(tmp_path)] == [50, 900, 1000]


def test_select_last_and_every(tmp_path):
    for step in range(1, 7):
        save_file({"w": torch.zeros(1)}, str(tmp_path / f"step_{step}.safetensors"))
    found = discover(tmp_path)
    assert [c.step for c in select(found, last=3)] == [4, 5, 6]
    assert [c.step for c in select(found, every=2)] == [2, 4, 6]
    assert [c.step for c in select(found, last=2, every=2)] == [4, 6]
    with pytest.raises(ValueError, match="more checkpoints than the run has"):
        select(found, last=7)


def test_empty_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        discover(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        discover(tmp_path / "nope")
