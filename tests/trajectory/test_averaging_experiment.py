"""The averaging-vs-annealing experiment runs end to end in its small configuration."""

import importlib.util
import json
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "averaging_vs_annealing.py"


def test_small_configuration_runs_and_reports_every_scheme(tmp_path):
    spec = importlib.util.spec_from_file_location("averaging_vs_annealing", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--small", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "averaging_vs_annealing.png").stat().st_size > 10_000
    names = [r["what"] for r in saved["rows"]]
    assert any(n.startswith("SMA") for n in names) and any(n.startswith("WSM") for n in names)
    assert all(math.isfinite(r["val_loss"]) for r in saved["rows"])
    # Checkpoints of the constant run were saved where `mergelab average` finds them.
    assert len(list((tmp_path / "constant_run").glob("checkpoint-*"))) == len(result["checkpoint_steps"])
    # Training made progress: the loss curve went down from its first evaluation.
    curve = [loss for _, loss in saved["constant_curve"]]
    assert curve[-1] < curve[0]
