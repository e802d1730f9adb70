"""examples/optimizer_geometry.py in its fast configuration, and its objective J on hand-worked cases."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mergelab

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "optimizer_geometry.py"


@pytest.fixture(scope="module")
def og():
    spec = importlib.util.spec_from_file_location("optimizer_geometry", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fast_run(og, tmp_path_factory):
    out = tmp_path_factory.mktemp("optimizer_geometry")
    return out, og.main(["--fast", "--out", str(out)])


def test_objective_on_the_two_dimensional_example_of_the_issue(og):
    # G1 = diag(100, 1), G2 = diag(1, 100), theta1 = (0, 0), theta2 = (1, 1).
    models = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}]
    metrics = [{"w": torch.tensor([100.0, 1.0])}, {"w": torch.tensor([1.0, 100.0])}]
    midpoint = {"w": torch.tensor([0.5, 0.5])}
    assert og.objective(midpoint, models, metrics) == pytest.approx(50.5)
    # J at (1/101, 100/101): 2 * (100 (1/101)^2 + (100/101)^2) = 200/101.
    aware = {"w": torch.tensor([1 / 101, 100 / 101])}
    assert og.objective(aware, models, metrics) == pytest.approx(200 / 101)
    merged = mergelab.merge_state_dicts("optimizer_aware", models, stats=metrics, weight=1.0)
    assert torch.allclose(merged["w"], aware["w"])


def test_objective_without_metrics_is_the_summed_squared_distance(og):
    gen = torch.Generator().manual_seed(3)
    models = [{"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)} for _ in range(3)]
    theta = {"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}
    want = sum(np.sum((theta[k].numpy() - m[k].numpy()) ** 2) for m in models for k in theta)
    assert og.objective(theta, models, None) == pytest.approx(float(want), rel=1e-6)


def test_files_written(fast_run):
    out, result = fast_run
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "optimizer_geometry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_merge_minimises_the_objective_of_its_own_metric(og, fast_run):
    _, result = fast_run
    (run,) = result["runs"]
    for name, sc in run.items():
        rows = sc["rows"]
        for merge, metric in og.MERGES.items():
            own = rows[merge][f"J_{metric}"]
            for other in og.MERGES:
                # Fisher is floored at 1e-6 before merging, so its minimiser is off by a hair.
                assert own <= rows[other][f"J_{metric}"] * (1 + 1e-6), (name, merge, other)


def test_scores_are_real_numbers_and_training_helped(og, fast_run):
    _, result = fast_run
    (run,) = result["runs"]
    for sc in run.values():
        for label, r in sc["rows"].items():
            assert math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]), label
            assert 0 <= r["test_accuracy"] <= 1
        for model in sc["models"]:
            assert sc["rows"][model]["test_accuracy"] > 0.5  # chance is 0.1
    assert set(result["scenarios"]) == set(og.SCENARIOS)


def test_same_seed_same_numbers(og, fast_run, tmp_path):
    _, first = fast_run
    again = og.main(["--fast", "--out", str(tmp_path)])
    assert again["runs"] == first["runs"]
