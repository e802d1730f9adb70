"""The noise-scale mergeability experiment, reduced: its numbers and its measure of "lining up"."""

import math

import numpy as np
import pytest

from mergelab.analysis import noise_sweep as ns

TINY = ns.SweepConfig(lrs=(0.05,), batches=(16, 64), momenta=(0.0, 0.9), seeds=(0,), epochs=1.0,
                      shared_steps=20, lambdas=(0.5, 1.0), path_points=3, hidden=16, min_accuracy=0.0)


def test_quadratic_fit_recovers_a_known_peak_and_r2():
    x = np.linspace(-4, 0, 9)
    y = 1.0 - (x + 2.5) ** 2
    r2, peak = ns.quadratic_r2(x, y)
    assert r2 == pytest.approx(1.0) and peak == pytest.approx(-2.5)
    r2, peak = ns.quadratic_r2(x, 3 * x + 1)  # a line: perfect fit, no peak
    assert r2 == pytest.approx(1.0) and peak is None


def test_collapse_scores_the_true_predictor_highest():
    # gain is an exact function of log10 S; lr alone and B alone explain less of it.
    rows = []
    for lr in (0.01, 0.03, 0.1, 0.3):
        for batch in (8, 32, 128):
            for m in (0.0, 0.9):
                s = lr / (batch * (1 - m))
                rows.append({"lr": lr, "batch": batch, "momentum": m, "S": s, "S_k2": lr / (batch * (1 - m) ** 2),
                             "failed": False, "gain_linear": -(math.log10(s) + 2.5) ** 2})
    fits = ns.collapse(rows)
    assert fits["S (k=1)"]["r2"] == pytest.approx(1.0)
    assert fits["S (k=1)"]["peak"] == pytest.approx(10 ** -2.5)
    assert max(fits[k]["r2"] for k in ("lr", "batch", "lr / B")) < 0.9
    assert fits["S (k=1)"]["smooth_r2"] > max(fits[k]["smooth_r2"] for k in ("lr", "batch", "lr / B"))
    monotone = [{**r, "gain_linear": math.log10(r["S"])} for r in rows]
    assert ns.collapse(monotone)["S (k=1)"]["spearman"] == pytest.approx(1.0)


def test_branches_that_do_not_move_merge_with_zero_gain_and_zero_barrier():
    data = ns._data(0)
    shared = ns._shared_checkpoint(TINY, data, 0)
    row = ns._pair_row(TINY, data, shared, lr=1e-12, batch=32, momentum=0.0, seed=0)
    assert row["S"] == pytest.approx(1e-12 / 32)
    assert abs(row["gain_linear"]) < 1e-9 and abs(row["gain_ta"]) < 1e-9
    assert abs(row["loss_barrier"]) < 1e-5 and row["acc_a"] == row["acc_b"]


def test_reduced_sweep_is_deterministic_and_plots(tmp_path):
    rows = ns.run_sweep(TINY, progress=False)
    assert rows == ns.run_sweep(TINY, progress=False)
    assert len(rows) == 4 and not any(r["failed"] for r in rows)
    for r in rows:
        assert r["S"] == pytest.approx(r["lr"] / (r["batch"] * (1 - r["momentum"])))
        assert r["steps"] == round(TINY.epochs * 1257 / r["batch"])  # equal examples seen
        assert r["gain_linear"] == pytest.approx(r["acc_linear"] - (r["acc_a"] + r["acc_b"]) / 2)
    table = ns.summary_table(rows)
    assert [e["S"] for e in table] == sorted(e["S"] for e in table)
    path = ns.plot_sweep(rows, tmp_path / "sweep.png")
    assert path.stat().st_size > 10_000


def test_the_example_runs_fast(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "noise_scale_sweep", Path(__file__).resolve().parents[2] / "examples" / "noise_scale_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--fast", "--quiet", "--out", str(tmp_path)])
    assert (tmp_path / "noise_scale_sweep.png").is_file() and (tmp_path / "rows.json").is_file()
    assert set(summary["fits"]["gain_linear"]) == set(ns.PREDICTORS)


def test_smoother_r2_is_high_for_a_curve_and_low_for_noise():
    x = np.linspace(-4, -1, 30)
    curve = np.where(x < -2, x + 4, -5 * (x + 2) + 2)  # rise then a cliff: no quadratic shape
    assert ns.smooth_r2(x, curve) > 0.8
    noise = np.random.default_rng(0).standard_normal(30)
    assert ns.smooth_r2(x, noise) < 0.2


def test_spearman_with_ties_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    from mergelab.analysis.noise_sweep import _spearman

    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5])
    y = np.array([0.3, 0.1, 0.4, 0.4, 0.9, 0.2, 0.7, 0.0])
    assert _spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    # hand-worked: y a decreasing function of x (ties in x shared) gives -1
    assert _spearman(np.array([1.0, 2.0, 3.0]), np.array([9.0, 4.0, 1.0])) == pytest.approx(-1.0)
