"""Time `mergelab merge` of two source trees side by side (old vs new), alternating, on the bench recipes.

    python bench/ties_family_ab.py --old /tmp/old/src --new src --methods ties,dare_ties --repeats 2

Each run is its own subprocess (`python -m mergelab.cli merge RECIPE OUT --seed 0`) with PYTHONPATH
set to one tree; one untimed warm-up run per tree and method first (numba compiles or loads its
cache). Wall time around the subprocess, its CPU time (user + system, all threads: on a loaded
machine the steadier figure) and its peak RSS (ru_maxrss from wait4, which counts the pages of
memory-mapped inputs too) are printed per run, with the load average at the start. Outputs
go to a temporary folder under --out (default /tmp) and are deleted after each run; with --compare,
the first new and old outputs of each method are compared byte for byte first.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = Path("/work/main/bench/_work/recipes")


def run(tree: str, recipe: Path, out: Path) -> tuple[float, float, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    cmd = [sys.executable, "-m", "mergelab.cli", "merge", str(recipe), str(out), "--seed", "0"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20  # s, s, GiB


def same_outputs(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names if n.endswith(".safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--methods", default="ties,dare_ties,breadcrumbs_ties")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--recipes", default=str(RECIPES))
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args()
    trees = {"old": args.old, "new": args.new}
    work = Path(tempfile.mkdtemp(prefix="ties-out-ab-", dir=args.out))
    try:
        for method in args.methods.split(","):
            recipe = Path(args.recipes) / f"{method}.yml"
            for label, tree in trees.items():  # warm-up (numba cache), and the outputs to compare
                run(tree, recipe, work / label)
            if args.compare:
                print(f"{method}: outputs {'identical' if same_outputs(work / 'old', work / 'new') else 'DIFFER'}",
                      flush=True)
            for label in trees:
                shutil.rmtree(work / label)
            for r in range(args.repeats):
                order = list(trees) if r % 2 else list(trees)[::-1]
                for label in order:
                    load = os.getloadavg()[0]
                    wall, cpu, rss = run(trees[label], recipe, work / label)
                    shutil.rmtree(work / label)
                    print(f"{method:18s} {label}  wall {wall:6.2f} s  CPU {cpu:6.2f} s  peak RSS {rss:5.2f} GiB  "
                          f"load {load:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
