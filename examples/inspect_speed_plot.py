"""Bar chart of inspect_speed.py --json results: inspect wall and CPU seconds per code version and input.

    python examples/inspect_speed_plot.py OUT.png LABEL=run.json [LABEL=run.json ...]

Each LABEL names a bar group ("MiniLM new"); several files with one label are shown as their
median. A label ending in "read" draws the read floor of its runs instead of inspect.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    from mergelab.extras import require

    plt = require("matplotlib.pyplot", "plotting")
    out, pairs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    runs: dict[str, list[dict]] = {}
    for label, path in pairs:
        runs.setdefault(label, []).append(json.loads(Path(path).read_text()))
    labels = list(runs)
    what = {k: "read" if k.endswith("read") else "inspect" for k in labels}
    wall = [statistics.median(r[f"{what[k]}_wall_s"] for r in runs[k]) for k in labels]
    cpu = [statistics.median(r[f"{what[k]}_cpu_s"] for r in runs[k]) for k in labels]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    y = range(len(labels))
    ax.barh([i + 0.2 for i in y], wall, height=0.4, label="wall s")
    ax.barh([i - 0.2 for i in y], cpu, height=0.4, label="CPU s")
    ax.set_yticks(list(y), labels)
    ax.set_xscale("log")
    ax.set_xlabel("seconds (log scale), median of the runs")
    ax.legend()
    ax.set_title("mergelab inspect, in process, second call (2 cores, loaded machine)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    for k, w, c in zip(labels, wall, cpu):
        print(f"| {k} | {len(runs[k])} | {w:.2f} | {c:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
