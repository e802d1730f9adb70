"""Accuracy against the number of tasks on the digits suite: every registered method, 2 to 4 tasks, 3 seeds.

The digits suite of ``mergelab demo digits`` (four input-transform tasks, a pretrained
MLP, one fine-tune per task, Fisher and Gram statistics on each task's training data)
is built once per seed; then for every subset of 2, 3 and 4 tasks every method
registered in mergelab among mergelab.demos.suite.CANDIDATES merges the subset's
fine-tunes at its paper's defaults, and the merged MLP is scored on the subset's
tasks. Reported: average accuracy and normalised accuracy (merged / the task's own
fine-tune), mean over the subsets of a size, then mean and std over seeds.

    python examples/fusion_suite.py                 # 3 seeds, all 11 subsets (a few minutes)
    python examples/fusion_suite.py --fast          # 1 seed, one pair of tasks, small models (seconds)

Output: examples/_out/fusion_suite/{fusion_suite.json, fusion_suite.md, fusion_suite.png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from mergelab.demos import digits, suite

OUT = Path(__file__).resolve().parent / "_out" / "fusion_suite"
FAST_OVERRIDES = {"wudi": {"iterations": 20}}  # the fast mode's only change to a method's parameters


def score_fn(cfg: digits.DemoConfig, data: dict, seed: int):
    def score(state_dict: dict, subset) -> dict[str, float]:
        model = digits.make_mlp(cfg.hidden)
        model.load_state_dict(state_dict)
        return {t: digits.accuracy(model, digits.task_inputs(t, data["x_test"], seed), data["y_test"]) for t in subset}
    return score


def run_seed(cfg: digits.DemoConfig, seed: int, subsets: list, merges: list, log=print) -> list[dict[str, Any]]:
    """Build the four task models of one seed, then merge every subset of tasks with every method."""
    data = digits.load_digits_split(seed)
    built = digits.build_models(cfg, data, seed)
    tasks = list(digits.TASKS)
    individual = {t: digits.evaluate(m, data, seed)[t] for t, m in zip(tasks, built["models"])}
    score = score_fn(cfg, data, seed)
    records = []
    for subset in subsets:
        records.append(suite.run_subset(subset, tasks, built, individual, score, seed, merges))
        log(f"seed {seed} {'+'.join(subset)}: done")
    return records


def run(fast: bool, seeds: list[int], out: Path, log=print, only: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    cfg = digits.DemoConfig(**(digits.FAST if fast else {}))
    sizes = [2] if fast else [2, 3, 4]
    merges = suite.registered_merges(FAST_OVERRIDES if fast else None, only)
    subsets = suite.subsets(list(digits.TASKS), sizes)[:1 if fast else None]  # fast: the first pair only
    records = []
    with digits.single_thread():
        for seed in seeds:
            records += run_seed(cfg, seed, subsets, merges, log)
    summary = suite.aggregate(records)
    result = {"suite": "digits", "config": dataclasses.asdict(cfg) | {"fast": fast}, "seeds": seeds,
              "sizes": sizes, "tasks": list(digits.TASKS), "methods": {lb: [m, p] for lb, m, p in merges},
              "summary": summary, "errors": suite.errors(records), "records": records,
              "seconds": time.perf_counter() - start}
    write(result, out, f"digits: normalised accuracy vs tasks merged ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
    return result


def write(result: dict[str, Any], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "fusion_suite"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    table = suite.markdown_table(result["summary"], title)
    if result["errors"]:
        table += "\nNot run: " + "; ".join(f"{k} ({v[:160]})" for k, v in result["errors"].items()) + "\n"
    Path(f"{stem}.md").write_text(table)
    suite.plot_normalized(result["summary"], Path(f"{stem}.png"), title)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="1 seed, one pair of tasks, small models")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds, from 0 (default 3)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--methods", help="comma-separated labels of suite.CANDIDATES to run (default: every registered one)")
    args = ap.parse_args(argv)
    only = args.methods.split(",") if args.methods else None
    result = run(args.fast, list(range(1 if args.fast else args.seeds)), args.out, only=only)
    print(Path(args.out / "fusion_suite.md").read_text())
    print(f"{result['seconds']:.0f} s; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
