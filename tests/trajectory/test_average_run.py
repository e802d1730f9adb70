"""Streaming averages of a run's checkpoints, crash recovery, and the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab.cli.main import app
from mergelab.errors import CheckpointError, ShapeMismatch
from mergelab.trajectory.run import average_run, plan_average, recover_run


def _run(tmp_path, n=5, nan_at=None, shape=(4, 3)):
    torch.manual_seed(0)
    run = tmp_path / "run"
    states = []
    theta = torch.randn(shape)
    for i in range(n):
        theta = theta + 0.1 * torch.randn(shape)
        sd = {"layer.weight": theta.clone(), "layer.bias": torch.randn(shape[0]), "steps": torch.tensor([i])}
        if nan_at == i:
            sd["layer.weight"][0, 0] = float("nan")
        d = run / f"checkpoint-{(i + 1) * 100}"
        d.mkdir(parents=True)
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
        torch.save({"state": {}, "param_groups": []}, d / "optimizer.pt")
        states.append(sd)
    return run, states


def test_streaming_average_equals_in_memory_mean(tmp_path):
    run, states = _run(tmp_path)
    average_run(run, tmp_path / "out", scheme="sma", last=3, show_progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in ("layer.weight", "layer.bias"):
        torch.testing.assert_close(got[k], torch.stack([s[k] for s in states[-3:]]).mean(0))
    assert torch.equal(got["steps"], states[-1]["steps"])  # integer buffers come from the newest
    info = json.loads((tmp_path / "out" / "mergelab_average.json").read_text())
    assert [u["step"] for u in info["used"]] == [300, 400, 500]


def test_ema_average_matches_the_recursion(tmp_path):
    run, states = _run(tmp_path, n=4)
    average_run(run, tmp_path / "out", scheme="ema", alpha=0.6, show_progress=False)
    ema = states[0]["layer.weight"]
    for s in states[1:]:
        ema = 0.6 * ema + 0.4 * s["layer.weight"]
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(got["layer.weight"], ema)


def test_skip_unstable_leaves_out_nan_checkpoint(tmp_path):
    run, states = _run(tmp_path, nan_at=3)
    report = average_run(run, tmp_path / "out", skip_unstable=True, show_progress=False)
    assert [u[0] for u in report.used] == [100, 200, 300, 500]
    assert [s for s, _, _ in report.skipped] == [400] and "NaN" in report.skipped[0][2]
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = torch.stack([states[i]["layer.weight"] for i in (0, 1, 2, 4)]).mean(0)
    torch.testing.assert_close(got["layer.weight"], want)
    info = json.loads((tmp_path / "out" / "mergelab_average.json").read_text())
    assert [s["step"] for s in info["skipped"]] == [400]


def test_loss_spike_in_trainer_state_marks_later_checkpoints(tmp_path):
    run, _ = _run(tmp_path)
    history = [{"step": s, "loss": 2.0 - 0.01 * s / 10} for s in range(10, 310, 10)]
    history += [{"step": 310, "loss": 40.0}] + [{"step": s, "loss": 9.0} for s in range(320, 510, 10)]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    chosen, _, skipped = plan_average(run, skip_unstable=True)
    assert [c.step for c in chosen] == [100, 200, 300]
    assert all("spike at step 310" in why for _, why in skipped)


def test_recover_averages_stable_and_copies_optimizer_state(tmp_path):
    run, states = _run(tmp_path, nan_at=4)
    report = recover_run(run, tmp_path / "resume", last=2)
    got = load_file(str(tmp_path / "resume" / "model.safetensors"))
    torch.testing.assert_close(got["layer.weight"], (states[2]["layer.weight"] + states[3]["layer.weight"]) / 2)
    assert (tmp_path / "resume" / "optimizer.pt").exists()
    assert [s for s, _, _ in report.skipped] == [500]


def test_bad_input(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        plan_average(tmp_path)
    run, _ = _run(tmp_path, n=3)
    with pytest.raises(ValueError, match="more checkpoints than the run has"):
        plan_average(run, last=5)
    save_file({"layer.weight": torch.zeros(5, 3), "layer.bias": torch.zeros(4), "steps": torch.tensor([9])},
              str(run / "checkpoint-100" / "model.safetensors"))
    with pytest.raises(ShapeMismatch, match="checkpoint-100"):
        average_run(run, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_average(tmp_path):
    run, states = _run(tmp_path)
    result = CliRunner().invoke(app, ["average", str(run), str(tmp_path / "out"), "--scheme", "wsm",
                                      "--decay", "linear", "--last", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    # WSM with a linear decay = uniform weights over the window.
    torch.testing.assert_close(got["layer.weight"], torch.stack([s["layer.weight"] for s in states[-4:]]).mean(0))
    assert "500" in result.output


def test_cli_explicit_checkpoints(tmp_path):
    run, states = _run(tmp_path)
    picks = [str(run / "checkpoint-500"), str(run / "checkpoint-100")]
    args = ["average", str(run), str(tmp_path / "out"), "--quiet"]
    for p in picks:
        args += ["--checkpoint", p]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(got["layer.weight"], (states[0]["layer.weight"] + states[4]["layer.weight"]) / 2)


def test_cli_recover(tmp_path):
    run, states = _run(tmp_path, nan_at=4)
    result = CliRunner().invoke(app, ["recover", str(run), str(tmp_path / "resume"), "--last", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    got = load_file(str(tmp_path / "resume" / "model.safetensors"))
    torch.testing.assert_close(got["layer.weight"], (states[2]["layer.weight"] + states[3]["layer.weight"]) / 2)
    assert "skipped" in result.output and "optimizer.pt" in result.output
