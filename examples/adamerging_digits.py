"""AdaMerging on the digits suite: task arithmetic at lambda 0.3 against task-wise and layer-wise AdaMerging.

The four task MLPs of `mergelab demo` (mergelab.demos.digits: one base, fine-tuned on rotated,
mirrored, shifted and pixel-shuffled digits) are merged by task arithmetic with every lambda 0.3
(FusionBench's default), and by AdaMerging at FusionBench's defaults (lambda initialised to 0.3,
Adam lr 1e-3, 1000 steps, no clamp, batches of 16), learning its coefficients on the unlabelled
test inputs of each task (the paper's test-time setting). Accuracy on each task's test split,
averaged over the four tasks and over seeds; also with 2 tasks (rotate, mirror).

    PYTHONPATH=src python examples/adamerging_digits.py [--seeds 3] [--steps 1000]
"""

from __future__ import annotations

import argparse
import time

import torch

import mergelab
from mergelab.demos.digits import (TASKS, DemoConfig, build_models, evaluate, load_digits_split, make_mlp,
                                   single_thread, task_inputs)


def _accuracy(state, cfg, data, seed, tasks):
    model = make_mlp(cfg.hidden)
    model.load_state_dict(state)
    acc = evaluate(model, data, seed)
    return sum(acc[t] for t in tasks) / len(tasks)


def run_seed(seed: int, steps: int, tasks: list[str]) -> dict[str, float]:
    cfg = DemoConfig()
    data = load_digits_split(seed)
    built = build_models(cfg, data, seed)
    index = [list(TASKS).index(t) for t in tasks]
    base, models = built["base"], [built["models"][i] for i in index]
    row = {"individual": sum(evaluate(m, data, seed)[t] for m, t in zip(models, tasks)) / len(tasks)}
    ta = mergelab.merge_state_dicts("task_arithmetic", [m.state_dict() for m in models], base=base.state_dict(),
                                    weight=1.0, **{"lambda": 0.3})
    row["task_arithmetic_0.3"] = _accuracy(ta, cfg, data, seed, tasks)
    unlabelled = {t: list(task_inputs(t, data["x_test"], seed).split(16)) for t in tasks}
    for granularity in ("task", "layer"):
        t0 = time.perf_counter()
        r = mergelab.adamerging(base, models, unlabelled, granularity=granularity, steps=steps, seed=seed)
        seconds = time.perf_counter() - t0
        from mergelab.search.adamerging import MergedFunction

        fn = MergedFunction(base, models, granularity=granularity)
        state = {n: t.detach() for n, t in fn.params(r.lambdas).items()}
        row[f"adamerging_{granularity}"] = _accuracy(state, cfg, data, seed, tasks)
        row[f"entropy_{granularity}"] = (r.losses[0] / len(tasks), r.losses[-1] / len(tasks))
        row[f"seconds_{granularity}"] = seconds
    return row


def print_table(rows: list[dict]) -> None:
    """The markdown table of mean ± std accuracy over seeds, and the entropy and time of each granularity."""
    print("| merge | average accuracy (mean ± std over seeds) |\n|---|---|")
    for key in ("individual", "task_arithmetic_0.3", "adamerging_task", "adamerging_layer"):
        vals = torch.tensor([r[key] for r in rows])
        print(f"| {key} | {100 * vals.mean():.1f} ± {100 * vals.std(correction=0):.1f} |")
    for g in ("task", "layer"):
        h0 = sum(r[f"entropy_{g}"][0] for r in rows) / len(rows)
        h1 = sum(r[f"entropy_{g}"][1] for r in rows) / len(rows)
        s = sum(r[f"seconds_{g}"] for r in rows) / len(rows)
        print(f"{g}-wise: mean entropy per task {h0:.3f} -> {h1:.3f}, {s:.1f} s per run")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    with single_thread():
        for tasks in (["rotate", "mirror"], list(TASKS)):
            rows = [run_seed(s, args.steps, tasks) for s in range(args.seeds)]
            print(f"\n{len(tasks)} tasks ({', '.join(tasks)}), {args.seeds} seeds, {args.steps} steps")
            print_table(rows)

if __name__ == "__main__":
    main()
