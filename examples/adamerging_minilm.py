"""AdaMerging of two MiniLM fine-tunes (the suite of examples/minilm_regmean_fisher.py), each task with its head.

Two copies of the all-MiniLM-L6-v2 encoder are fine-tuned with their own linear heads on two text
tasks built from the Python standard library (code_or_prose, 2 classes; module_family, 4 classes;
see minilm_regmean_fisher.py). The encoders are merged by task arithmetic with lambda 0.3, and by
task-wise and layer-wise AdaMerging, whose coefficients are learned by minimising the entropy of
each task's head on that task's unlabelled test sentences (heads= in mergelab.adamerging: the heads
stay fixed, as in FusionBench's CLIP AdaMerging). Accuracy of each merged encoder under each task's
head, averaged over the tasks, mean ± std over seeds.

    PYTHONPATH=src python examples/adamerging_minilm.py [--seeds 3] [--steps 50] [--lr 1e-2]

FusionBench's defaults are 1000 steps at lr 1e-3; on a shared 2-core CPU one step of the two tasks
costs about 3 s here, so the defaults of this script are 50 steps at lr 1e-2 (Adam moves each
coefficient by up to about lr per step, so the reachable range is the same 0.5).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import mergelab  # noqa: E402
from adamerging_digits import print_table  # noqa: E402
from minilm_regmean_fisher import batches, build_tasks, fine_tune, minilm_path, score  # noqa: E402


def _mean_pool(out, batch):
    h = out.last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def run_seed(seed: int, args) -> dict[str, float]:
    from transformers import AutoModel, AutoTokenizer

    cfg = argparse.Namespace(steps=200, batch=16, lr=5e-5, head_lr=2e-3, max_len=48, train_per_class=300,
                             test_per_class=100, seed=seed)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    tasks = build_tasks(cfg)
    models = {name: fine_tune(cfg, tok, task, seed + k) for k, (name, task) in enumerate(tasks.items())}
    # clones: score() loads each merged encoder into the probes (copies of the fine-tunes), in place
    encoders = [{k: v.clone() for k, v in m.encoder.state_dict().items()} for m in models.values()]
    probes = {n: copy.deepcopy(m).eval() for n, m in models.items()}
    base = AutoModel.from_pretrained(minilm_path()).eval()
    avg = lambda acc: sum(acc.values()) / len(acc)  # noqa: E731
    row = {"individual": avg({n: score(sd, {n: probes[n]}, tok, tasks, cfg.max_len)[n]
                              for n, sd in zip(tasks, encoders)})}
    ta = mergelab.merge_state_dicts("task_arithmetic", encoders, base=base.state_dict(), weight=1.0,
                                    **{"lambda": 0.3})
    row["task_arithmetic_0.3"] = avg(score(ta, probes, tok, tasks, cfg.max_len))
    unlabelled = {n: [{k: v for k, v in b.items() if k != "labels"} for b in batches(tok, t["test"], cfg.max_len, 16)]
                  for n, t in tasks.items()}
    heads = {n: (lambda out, batch, head=m.head: head(_mean_pool(out, batch))) for n, m in models.items()}
    for granularity in ("task", "layer"):
        t0 = time.perf_counter()
        r = mergelab.adamerging(base, encoders, unlabelled, heads=heads, granularity=granularity,
                                steps=args.steps, lr=args.lr, seed=seed)
        from mergelab.search.adamerging import MergedFunction

        fn = MergedFunction(base, encoders, granularity=granularity)
        state = {**base.state_dict(), **{n: t.detach() for n, t in fn.params(r.lambdas).items()}}
        row[f"adamerging_{granularity}"] = avg(score(state, probes, tok, tasks, cfg.max_len))
        row[f"entropy_{granularity}"] = (r.losses[0] / 2, r.losses[-1] / 2)
        row[f"seconds_{granularity}"] = time.perf_counter() - t0
        row[f"lambda_{granularity}"] = r.lambdas.reshape(2, -1).mean(1).tolist()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rows = []
    for s in range(args.seeds):
        rows.append(run_seed(s, args))
        print(f"seed {s}: {rows[-1]}", flush=True)
    print(f"\nMiniLM, 2 tasks, {args.seeds} seeds, AdaMerging {args.steps} steps at lr {args.lr}")
    print_table(rows)

if __name__ == "__main__":
    main()
