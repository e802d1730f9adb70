"""Effective noise scale: hand-worked values, invariants, and reading Hugging Face configurations."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.analysis.noise_scale import effective_noise_scale, noise_scale_from_trainer
from mergelab.cli.tables import render_noise_scale
from mergelab.errors import MergeError

FAST = settings(max_examples=25, deadline=None)


def test_hand_worked_values():
    assert effective_noise_scale(0.1, 128) == pytest.approx(0.1 / 128)
    assert effective_noise_scale(0.1, 128, 0.9) == pytest.approx(0.1 / (128 * 0.1))  # 0.0078125
    assert effective_noise_scale(0.1, 128, 0.9, k=2) == pytest.approx(0.1 / (128 * 0.01))
    assert effective_noise_scale(0.1, 128, 0.9, augmentation_variance=2.0) == pytest.approx(2 * 0.0078125)


@FAST
@given(lr=st.floats(1e-5, 1.0), batch=st.integers(1, 4096), m=st.floats(0, 0.99), scale=st.integers(1, 16))
def test_invariants(lr, batch, m, scale):
    s = effective_noise_scale(lr, batch, m)
    # Linear scaling rule: lr and batch size scaled together leave the noise scale unchanged.
    assert effective_noise_scale(lr * scale, batch * scale, m) == pytest.approx(s, rel=1e-9)
    # k = 1 is plain SGD's lr / B at the effective learning rate lr / (1 - m).
    assert effective_noise_scale(lr / (1 - m), batch) == pytest.approx(s, rel=1e-9)
    assert effective_noise_scale(lr, batch, m, k=2) == pytest.approx(s / (1 - m), rel=1e-9)


@pytest.mark.parametrize("kwargs", [dict(lr=0.0, batch_size=8), dict(lr=0.1, batch_size=0),
                                    dict(lr=0.1, batch_size=8, momentum=1.0),
                                    dict(lr=0.1, batch_size=8, augmentation_variance=0.0)])
def test_invalid_settings_are_merge_errors(kwargs):
    with pytest.raises(MergeError, match="effective_noise_scale"):
        effective_noise_scale(**kwargs)


def test_from_training_arguments_dict_adam():
    args = {"learning_rate": 5e-5, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4,
            "optim": "adamw_torch", "adam_beta1": 0.8}
    result = noise_scale_from_trainer(args, world_size=2)
    assert result.batch_size == 64 and result.momentum == 0.8
    assert result.noise_scale == pytest.approx(5e-5 / (64 * 0.2))
    assert any("adam_beta1" in note for note in result.notes)
    assert render_noise_scale(result).row_count == 5 + len(result.notes)


def test_from_folder_with_sgd_and_trainer_state(tmp_path):
    (tmp_path / "training_args.json").write_text(json.dumps(
        {"learning_rate": 0.05, "per_device_train_batch_size": 32, "gradient_accumulation_steps": 1,
         "optim": "sgd", "optim_args": "momentum=0.9, nesterov=False"}))
    result = noise_scale_from_trainer(tmp_path)
    assert result.momentum == 0.9 and result.batch_size == 32
    assert result.noise_scale == pytest.approx(0.05 / (32 * 0.1))
    assert any("world size" in note for note in result.notes)
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"train_batch_size": 16, "log_history": [
        {"learning_rate": 1e-4, "step": 10}, {"learning_rate": 3e-4, "step": 20}, {"loss": 1.0, "step": 20}]}))
    only_state = noise_scale_from_trainer(state, momentum=0.0)
    assert (only_state.lr, only_state.batch_size) == (3e-4, 16)
    assert only_state.noise_scale == pytest.approx(3e-4 / 16)


def test_from_transformers_training_arguments(tmp_path):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=0.01,
                                          per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                          optim="sgd", optim_args="momentum=0.5", report_to=[])
    result = noise_scale_from_trainer(args)
    assert result.noise_scale == pytest.approx(0.01 / (8 * 0.5))


def test_unknown_optimizer_and_missing_files_are_clear(tmp_path):
    with pytest.raises(MergeError, match="pass momentum= explicitly"):
        noise_scale_from_trainer({"learning_rate": 0.1, "per_device_train_batch_size": 8, "optim": "shampoo"})
    with pytest.raises(MergeError, match="no training_args.json or trainer_state.json"):
        noise_scale_from_trainer(tmp_path)
