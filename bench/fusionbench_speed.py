"""mergelab against FusionBench 0.2.33: folder in -> folder out on a 110M-parameter BERT and 3 fine-tunes.

The inputs are Hugging Face folders written by this script under <work-dir>/inputs/<size>/:
a BertModel shaped like bert-base-uncased (hidden 768, 12 layers, 12 heads,
intermediate 3072, vocab 30522: 109.5M parameters) with seeded random weights,
and three "fine-tunes", each the base plus its own seeded N(0, 1e-3^2) noise, all
float32 safetensors. For every method both tools implement, each tool runs as a
fresh subprocess of this script (``--child``):

    mergelab:     mergelab.merge(recipe, out)  (the recipe names the four folders)
    FusionBench:  BaseModelPool of the four folders, each loaded with
                  transformers.AutoModel.from_pretrained; Algorithm(...).run(pool);
                  save_pretrained(out) of the merged model

Measured per run (bench/run.py's `measure`): wall time of the subprocess, its
peak RSS (ru_maxrss from wait4) and peak anonymous memory (RssAnon, polled), and,
reported by the child itself, the seconds from after its imports to the written
folder. The order of the two tools alternates between repeats.

    python bench/fusionbench_speed.py                       # every shared method once, bert-base shape
    python bench/fusionbench_speed.py --repeat 3 --methods ties,tsv
    python bench/fusionbench_speed.py --size tiny           # seconds (the test's shape)

Results: bench/results/fusionbench_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))
import run as mk_bench  # noqa: E402  (bench/run.py: measure, _child_env)

# bench/ off the path again: its kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != _BENCH]

REPO = Path(__file__).resolve().parent.parent
SIZES = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           vocab_size=30522),
         "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      vocab_size=128, max_position_embeddings=64)}
FINETUNES = ("ft_1", "ft_2", "ft_3")
NOISE = 1e-3
WUDI_ITERATIONS = 10  # WUDI is iterative (300 Adam steps by default): both tools run this many

# label -> (mergelab method, shared recipe parameters, FusionBench class, its arguments). Same
# computation on both sides: lambda 0.3, TIES keeps the top 20% and sums the elected entries
# (FusionBench merge_func "sum" = mergelab normalize false), DARE drops half and rescales by 1/(1-p).
PAIRS: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.3}, "TaskArithmeticAlgorithm", {"scaling_factor": 0.3}),
    "ties": ("ties", {"lambda": 0.3, "density": 0.2, "normalize": False}, "TiesMergingAlgorithm",
             {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "sum"}),
    "dare_task_arithmetic": ("dare_linear", {"lambda": 0.3, "density": 0.5}, "DareTaskArithmetic",
                             {"scaling_factor": 0.3, "sparsity_ratio": 0.5, "only_on_linear_weights": False,
                              "rescale": True}),
    "dare_ties": ("dare_ties", {"lambda": 0.3, "density": 0.5, "normalize": False}, "DareTiesMerging",
                  {"scaling_factor": 0.3, "sparsity_ratio": 0.5, "only_on_linear_weights": False, "rescale": True,
                   "threshold": 99, "remove_keys": [], "merge_func": "sum"}),
    "tsv": ("tsv", {"alpha": 1.0}, "TaskSingularVectorMerging", {"alpha": 1.0}),
    "iso_c": ("iso_c", {"alpha": 1.0}, "IsotropicMergingInCommonSubspace", {"scaling_factor": 1.0}),
    "iso_cts": ("iso_cts", {"alpha": 1.0, "common_space_fraction": 0.8}, "IsotropicMergingInCommonAndTaskSubspace",
                {"scaling_factor": 1.0, "common_space_fraction": 0.8}),
    "model_stock": ("model_stock", {}, "ModelStock", {}),
    "magmax": ("magmax", {"lambda": 0.5}, "MagMaxAlgorithm", {"scaling_factor": 0.5}),
    "wudi": ("wudi", {"iterations": WUDI_ITERATIONS}, "WUDIMerging", {"iter_num": WUDI_ITERATIONS}),
    "emr": ("emr", {}, "EMRMerging", {}),
}
# FusionBench's TallMaskTaskArithmeticAlgorithm has no pair: on a pool of transformers models it stops
# with a TypeError (Parameter minus Tensor; tests/fusionbench/test_masks.py pins it).
PER_MODEL_WEIGHT = {"task_arithmetic", "ties", "dare_linear", "dare_ties"}  # weight 1 on each fine-tune


def make_inputs(root: Path, size: str, log=print) -> dict[str, Path]:
    """base and ft_1..3 as HF folders under root/<size>; reused when a finished set is there."""
    folder = root / size
    paths = {name: folder / name for name in ("base", *FINETUNES)}
    stamp = folder / "done.json"
    want = {"config": SIZES[size], "noise": NOISE, "seed": 0}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return paths
    import torch
    from transformers import BertConfig, BertModel

    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig(**SIZES[size]))
    log(f"writing {size} BERT inputs ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    model.save_pretrained(paths["base"])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(FINETUNES, 1):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(base[k] + NOISE * torch.randn(v.shape, generator=gen) if v.is_floating_point() else base[k])
        model.save_pretrained(paths[name])
    stamp.write_text(json.dumps(want))
    return paths


def recipe(label: str, paths: dict[str, Path]) -> dict[str, Any]:
    method, params, _, _ = PAIRS[label]
    per_model = {"weight": 1.0} if method in PER_MODEL_WEIGHT else {}
    models = [{"model": str(paths[n]), **({"parameters": per_model} if per_model else {})} for n in FINETUNES]
    return {"merge_method": method, "base_model": str(paths["base"]), "models": models,
            "parameters": params, "dtype": "float32"}


def child_mergelab(label: str, paths: dict[str, Path], out: Path) -> None:
    import mergelab

    mergelab.merge(recipe(label, paths), out, seed=0, device="cpu", overwrite=True)


def child_fusionbench(label: str, paths: dict[str, Path], out: Path) -> None:
    import fusion_bench.method as fb_method
    from fusion_bench.modelpool import BaseModelPool

    _, _, cls, kwargs = PAIRS[label]
    names = {"_pretrained_": paths["base"], **{n: paths[n] for n in FINETUNES}}
    pool = BaseModelPool({n: {"_target_": "transformers.AutoModel.from_pretrained",
                              "pretrained_model_name_or_path": str(p)} for n, p in names.items()})
    algorithm = getattr(fb_method, cls, None)
    if algorithm is None:  # not re-exported by fusion_bench.method (EMRMerging)
        from fusion_bench.method.emr_merging import EMRMerging as algorithm
    merged = algorithm(**kwargs).run(pool)
    if hasattr(merged, "save_pretrained"):
        merged.save_pretrained(out)
    else:  # EMR's EMRModulatedModel: the unified task vector, every task's mask and rescaler
        import torch

        out.mkdir(parents=True)
        torch.save(merged.state_dict(), out / "emr_model.pt")


def child_main(args: argparse.Namespace) -> None:
    """One tool, one method: imports, then the timed folder-in -> folder-out; seconds to --timing."""
    import torch

    torch.manual_seed(0)
    paths = {n: args.inputs / n for n in ("base", *FINETUNES)}
    run = child_mergelab if args.child == "mergelab" else child_fusionbench
    if args.child == "fusionbench":
        import fusion_bench  # noqa: F401  (its ~8 s import is start-up, not merging)
    t0 = time.perf_counter()
    run(args.method, paths, args.out)
    args.timing.write_text(json.dumps({"merge_s": time.perf_counter() - t0}))


def run_pair(label: str, inputs: Path, work: Path, order: tuple[str, str]) -> list[dict[str, Any]]:
    """Both tools on one method, each in a fresh subprocess; outputs removed after each run."""
    records = []
    for tool in order:
        out, timing, log = work / f"out_{tool}", work / f"timing_{tool}.json", work / "logs" / f"{label}_{tool}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        timing.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", tool, "--method", label,
               "--inputs", str(inputs), "--out", str(out), "--timing", str(timing)]
        env = mk_bench._child_env() | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        rec = {"method": label, "tool": tool, **mk_bench.measure(cmd, env, log)}
        rec["merge_s"] = json.loads(timing.read_text())["merge_s"] if timing.exists() else None
        rec["wrote"] = sorted(p.name for p in out.glob("*")) if out.exists() else []
        if rec["rc"]:
            rec["error"] = log.read_text(errors="replace")[-600:]
        records.append(rec)
        shutil.rmtree(out, ignore_errors=True)
    return records


def _median(records: list[dict], tool: str, key: str) -> float | None:
    vals = [r[key] for r in records if r["tool"] == tool and not r["rc"] and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: each tool's median wall, merge seconds, peak RSS and anon; FusionBench / mergelab ratios."""
    rows = []
    for label in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == label]
        row: dict[str, Any] = {"method": label}
        for tool in ("mergelab", "fusionbench"):
            for key in ("wall_s", "merge_s", "max_rss_bytes", "peak_anon_bytes"):
                row[f"{tool}_{key}"] = _median(rs, tool, key)
        for key in ("wall_s", "merge_s", "max_rss_bytes"):
            a, b = row[f"fusionbench_{key}"], row[f"mergelab_{key}"]
            row[f"ratio_{key}"] = a / b if a and b else None
        row["errors"] = {r["tool"]: r["error"] for r in rs if r.get("error")}
        rows.append(row)
    return rows


def render_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def f(v, fmt):
        return "failed" if v is None else format(v, fmt)

    lines = [f"# mergelab vs FusionBench {meta['fusionbench']}: {meta['size']} BERT ({meta['params_m']:.2f}M "
             f"parameters), base + 3 fine-tunes, float32", "",
             f"{meta['repeat']} repetition(s), median; {meta['date']}; {meta['cpus']} CPU threads per run; "
             f"WUDI at {WUDI_ITERATIONS} iterations in both.", "",
             "| method | mergelab wall s | FusionBench wall s | wall ratio | mergelab merge s | FusionBench merge s "
             "| merge ratio | mergelab peak RSS GB | FusionBench peak RSS GB | RSS ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gb = [None if r[f"{t}_max_rss_bytes"] is None else r[f"{t}_max_rss_bytes"] / 1e9
              for t in ("mergelab", "fusionbench")]
        lines.append(f"| {r['method']} | {f(r['mergelab_wall_s'], '.2f')} | {f(r['fusionbench_wall_s'], '.2f')} | "
                     f"{f(r['ratio_wall_s'], '.1f')} | {f(r['mergelab_merge_s'], '.2f')} | "
                     f"{f(r['fusionbench_merge_s'], '.2f')} | {f(r['ratio_merge_s'], '.1f')}x | {f(gb[0], '.2f')} | "
                     f"{f(gb[1], '.2f')} | {f(r['ratio_max_rss_bytes'], '.1f')}x |")
    lines += ["", "Wall: the whole subprocess (Python start, imports, load, merge, save). Merge: what the child "
              "timed after its imports, folder in to folder out. Ratio: FusionBench / mergelab (> 1: mergelab "
              "faster or smaller). Peak RSS: ru_maxrss of the subprocess (wait4)."]
    return "\n".join(lines) + "\n"


def shared_methods() -> list[str]:
    """The PAIRS whose mergelab method is registered now."""
    import mergelab

    have = mergelab.methods()
    return [label for label, (method, *_) in PAIRS.items() if method in have]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", help=f"comma-separated, from {', '.join(PAIRS)} (default: every shared one)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool per method (median reported)")
    ap.add_argument("--size", choices=list(SIZES), default="bert-base")
    ap.add_argument("--work-dir", type=Path, default=REPO / "bench" / "_work" / "fusionbench")
    ap.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--child", choices=["mergelab", "fusionbench"], help=argparse.SUPPRESS)
    for name in ("--method",):
        ap.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--inputs", "--out", "--timing"):
        ap.add_argument(name, type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _meta(args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, Any]:
    from importlib.metadata import version

    from safetensors import safe_open

    with safe_open(str(paths["base"] / "model.safetensors"), "pt") as st:
        n = sum(st.get_slice(k).get_shape().numel() if hasattr(st.get_slice(k).get_shape(), "numel")
                else _prod(st.get_slice(k).get_shape()) for k in st.keys())
    return {"size": args.size, "config": SIZES[args.size], "params_m": n / 1e6, "repeat": args.repeat,
            "fusionbench": version("fusion-bench"), "mergelab_commit": _git_head(),
            "cpus": os.environ.get("OMP_NUM_THREADS", "2"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _git_head() -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    labels = args.methods.split(",") if args.methods else shared_methods()
    paths = make_inputs(args.work_dir / "inputs", args.size)
    records = []
    for rep in range(args.repeat):
        for label in labels:
            order = ("mergelab", "fusionbench") if rep % 2 == 0 else ("fusionbench", "mergelab")
            records += run_pair(label, paths["base"].parent, args.work_dir, order)
            print(f"repeat {rep + 1}: {label}: " + ", ".join(
                f"{r['tool']} {r['wall_s']:.1f} s{' FAILED' if r['rc'] else ''}" for r in records[-2:]), flush=True)
            result = write_results(args, paths, records)  # after every pair: a cut-off run keeps what it measured
    print(render_markdown(result["rows"], result["meta"]))
    return result


def write_results(args: argparse.Namespace, paths: dict[str, Path], records: list[dict]) -> dict[str, Any]:
    rows = summarize(records)
    result = {"meta": _meta(args, paths), "rows": rows, "records": records}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "fusionbench_speed.json").write_text(json.dumps(result, indent=1))
    (args.results_dir / "fusionbench_speed.md").write_text(render_markdown(rows, result["meta"]))
    return result


if __name__ == "__main__":
    main()
