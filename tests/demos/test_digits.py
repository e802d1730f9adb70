"""The digits demo in its fast configuration: real properties of its numbers, not just that it ran."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mergelab.demos import digits as demo


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, demo.run_digits_demo(out, fast=True, show=False)


def _numbers(result: dict) -> dict:
    """The result without wall-clock times, which differ from run to run."""
    drop = {"seconds", "stats_seconds"}
    if isinstance(result, dict):
        return {k: _numbers(v) for k, v in result.items() if k not in drop}
    if isinstance(result, list):
        return [_numbers(v) for v in result]
    return result


def test_files_written_and_match_the_returned_result(fast_run):
    out, result = fast_run
    assert json.loads((out / "digits_demo.json").read_text()) == json.loads(json.dumps(result))
    png = (out / "digits_demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_every_fine_tune_beats_chance_and_the_base_on_its_own_task(fast_run):
    _, result = fast_run
    for task, acc in result["individual"].items():
        assert acc > 0.5, task  # chance is 0.1 with ten classes
        assert acc > result["pretrained"][task] + 0.2, task
    # The base was pretrained on plain digits: a pixel shuffle leaves it near chance.
    assert result["pretrained"]["shuffle"] < 0.3
    assert {t["optimizer"] for t in result["tasks"].values()} == {"adam", "sgd"}


def test_every_method_ran_and_its_summary_numbers_are_consistent(fast_run):
    _, result = fast_run
    assert [m["method"] for m in result["merges"].values()] == [m for _, m, _ in demo.MERGES]
    (run,) = result["runs"]  # the fast configuration has one replicate
    for label, r in run["merges"].items():
        accs = list(r["accuracy"].values())
        assert len(accs) == 4 and all(math.isfinite(a) and 0 <= a <= 1 for a in accs), label
        assert r["average"] == pytest.approx(np.mean(accs))
        ratios = [r["accuracy"][t] / run["individual"][t] for t in run["individual"]]
        assert r["normalized"] == pytest.approx(np.mean(ratios))
        assert r["seconds"] >= 0
        assert result["merges"][label]["accuracy"] == pytest.approx(r["accuracy"])


def test_summary_is_the_mean_and_sample_std_over_replicates():
    def run(shift: float) -> dict:
        acc = {t: 0.5 + shift for t in demo.TASKS}
        merges = {label: {"accuracy": acc, "average": 0.5 + shift, "normalized": 0.6 + shift, "seconds": 1.0,
                          "warnings": [f"w{shift}"]} for label, _, _ in demo.MERGES}
        return {"pretrained": acc, "individual": acc, "merges": merges}

    out = demo.summarize([run(0.0), run(0.1), run(0.2)])
    tsv = out["merges"]["tsv"]
    assert tsv["average"] == pytest.approx(0.6) and tsv["normalized"] == pytest.approx(0.7)
    assert tsv["average_std"] == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / 2)
    assert tsv["accuracy"]["shift"] == pytest.approx(0.6)
    assert tsv["warnings"] == ["w0.0", "w0.1", "w0.2"]


def test_same_seed_same_numbers(fast_run, tmp_path):
    _, first = fast_run
    again = demo.run_digits_demo(tmp_path, fast=True, show=False)
    assert _numbers(again) == _numbers(first)


def test_average_row_equals_a_hand_made_average_of_the_fine_tunes():
    cfg = demo.DemoConfig(**demo.FAST)
    data = demo.load_digits_split(0)
    with demo.single_thread():
        built = demo.build_models(cfg, data, seed=0)
        merges = demo.run_merges(cfg, built, data, {t: 1.0 for t in demo.TASKS}, seed=0)
    sds = [m.state_dict() for m in built["models"]]
    model = demo.make_mlp(cfg.hidden)
    model.load_state_dict({k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]})
    assert merges["average"]["accuracy"] == demo.evaluate(model, data, 0)
    # SGD keeps no preconditioner: its optimizer metric is 1 / learning rate everywhere.
    sgd_rows = [i for i, (_, kind) in enumerate(demo.TASKS.values()) if kind == "sgd"]
    for i in sgd_rows:
        for t in built["optimizer"][i].values():
            assert torch.allclose(t, torch.full_like(t, 1 / cfg.sgd_lr))


def test_task_transforms_do_what_they_say():
    img = np.arange(64, dtype=np.float32).reshape(8, 8)
    x = torch.from_numpy(img.reshape(1, 64))
    assert np.array_equal(demo.task_inputs("rotate", x, 0).numpy().reshape(8, 8), np.rot90(img))
    assert np.array_equal(demo.task_inputs("mirror", x, 0).numpy().reshape(8, 8), img[:, ::-1])
    shifted = np.zeros((8, 8), np.float32)
    shifted[2:, 2:] = img[:6, :6]
    assert np.array_equal(demo.task_inputs("shift", x, 0).numpy().reshape(8, 8), shifted)
    shuffled = demo.task_inputs("shuffle", x, 0).numpy().ravel()
    assert sorted(shuffled) == list(range(64)) and not np.array_equal(shuffled, img.ravel())
    assert np.array_equal(shuffled, demo.task_inputs("shuffle", x, 0).numpy().ravel())  # fixed, not redrawn
