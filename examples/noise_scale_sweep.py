"""Does the effective noise scale S = lr / (B (1 - m)^k) predict how well two models merge?

Branch pairs of a digits MLP are trained from one shared checkpoint with SGD under
a grid of learning rates, batch sizes and momenta (equal examples seen), merged
with mergelab (linear at 0.5, and task arithmetic with lambda chosen on a
validation split), and scored on a test split. The claim tested, from Zhang et
al. 2025 (arXiv:2510.04686): plotted against S, the merge gains of all
configurations line up on one non-monotonic curve with a sweet spot. See
mergelab/analysis/noise_sweep.py for the design and the measure of "lining up"
(R^2 of a quadratic in log10 of each candidate predictor).

    python examples/noise_scale_sweep.py              # full grid, a few minutes on 2 cores
    python examples/noise_scale_sweep.py --fast       # a tiny grid, seconds

Writes rows.json, summary.json and noise_scale_sweep.png into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mergelab.analysis.noise_sweep import SweepConfig, collapse, plot_sweep, run_sweep, summary_table

FAST = SweepConfig(lrs=(0.01, 0.1), batches=(8, 128), momenta=(0.0, 0.9), seeds=(0,), epochs=3.0,
                   shared_steps=100, path_points=5)
FULL = SweepConfig()


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def render(table: list[dict], fits: dict[str, dict], target: str = "gain_linear") -> tuple[Table, Table]:
    t = Table(title="Seed means per configuration, by S (k=1)")
    cols = ["lr", "batch", "momentum", "S", "failed", "acc_a", "gain_linear", "loss_gain_linear", "gain_ta",
            "loss_barrier"]
    for c in cols:
        t.add_column(c, justify="right")
    for e in table:
        t.add_row(*(_fmt(e[c]) for c in cols))
    f = Table(title=f"How well each predictor lines up {target} (on log10 of the predictor)")
    for c in ("predictor", "Spearman", "smoother LOO R^2", "quadratic R^2", "quadratic vertex"):
        f.add_column(c, justify="right")
    for name, fit in fits.items():
        f.add_row(name, _fmt(fit["spearman"]), _fmt(fit["smooth_r2"]), _fmt(fit["r2"]),
                  _fmt(fit["peak"]) if fit["peak"] is not None else "no peak")
    return t, f


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="a tiny grid that runs in seconds (what the tests run)")
    p.add_argument("--out", type=Path, default=Path("examples/_out/noise_scale_sweep"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    cfg = FAST if args.fast else FULL
    start = time.perf_counter()
    rows = run_sweep(cfg, progress=not args.quiet)
    seconds = time.perf_counter() - start
    table = summary_table(rows)
    fits = {t: collapse(rows, t) for t in ("gain_linear", "loss_gain_linear", "gain_ta", "loss_barrier")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    summary = {"seconds": seconds, "config": dataclasses.asdict(cfg), "table": table, "fits": fits}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot = plot_sweep(rows, args.out / "noise_scale_sweep.png", k=cfg.k)
    if not args.quiet:
        console = Console()
        for t in render(table, fits["gain_linear"]):
            console.print(t)
        console.print(render(table, fits["loss_gain_linear"], "loss_gain_linear")[1])
        console.print(render(table, fits["loss_barrier"], "loss_barrier")[1])
        console.print(f"{len(rows)} branch pairs in {seconds:.0f} s; plot: {plot}")
    return summary


if __name__ == "__main__":
    main()
