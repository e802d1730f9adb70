"""Benchmark mergelab against MergeKit 0.1.5: wall time and peak memory, side by side.

For each method, one recipe is written and both tools run it, each as its own
subprocess, in one run of this script (the order of the two tools alternates
between repeats). Wall time is measured around the subprocess; peak memory is
the kernel's high-water mark of the subprocess tree (ru_maxrss from wait4, the
same number `getrusage(RUSAGE_CHILDREN)` gives a wrapper that execs it) plus
the peak of anonymous memory (RssAnon summed over the tree, polled every
50 ms), because RSS also counts the pages of memory-mapped input files. The
I/O floor is the time to read the method's input checkpoints from page cache
plus the time to write an output of the same size with fsync.

    python bench/run.py --size tiny                    # quick check, seconds
    python bench/run.py --repeats 3                    # TinyLlama-1.1B shapes
    python bench/run.py --methods linear,ties --skip-mergekit
    python bench/run.py --layers 4 --methods task_arithmetic,nuslerp,karcher   # methods outside the default set
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_checkpoints as mc  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("mergekit", "mergelab")
CHUNK = 64 * 2**20  # read/write granularity of the I/O floor
SEED = 0

# method -> the input checkpoints its recipe reads (for the I/O floor)
METHODS = {
    "linear": ("ft_a", "ft_b"),
    "slerp": ("ft_a", "ft_b"),
    "ties": ("base", "ft_a", "ft_b"),
    "dare_ties": ("base", "ft_a", "ft_b"),
    "dare_linear": ("base", "ft_a", "ft_b"),
    "breadcrumbs_ties": ("base", "ft_a", "ft_b"),
    "della": ("base", "ft_a", "ft_b"),
    "sce": ("base", "ft_a", "ft_b"),
    # not run by default (the set above is the one docs/results.md §1 reports at 1.1B): --methods NAME
    "task_arithmetic": ("base", "ft_a", "ft_b"),
    "breadcrumbs": ("base", "ft_a", "ft_b"),
    "della_linear": ("base", "ft_a", "ft_b"),
    "model_stock": ("base", "ft_a", "ft_b"),
    "nuslerp": ("ft_a", "ft_b"),
    "multislerp": ("ft_a", "ft_b"),
    "karcher": ("ft_a", "ft_b"),
    "nearswap": ("ft_a", "ft_b"),
    "arcee_fusion": ("ft_a", "ft_b"),
}
DEFAULT_METHODS = ("linear", "slerp", "ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della", "sce")

# per-model parameters of the task-vector methods (every other parameter at both tools' defaults)
TASK_VECTOR_PARAMS = {
    "ties": {"weight": 0.5, "density": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
    "dare_linear": {"weight": 0.5, "density": 0.5},
    "breadcrumbs_ties": {"weight": 0.5, "density": 0.5, "gamma": 0.01},
    "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
    "task_arithmetic": {"weight": 0.5},
    "breadcrumbs": {"weight": 0.5, "density": 0.5, "gamma": 0.01},
    "della_linear": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
}


def recipe_for(method: str, paths: dict[str, Path]) -> dict:
    """The recipe both tools run: weights 0.5/0.5, density 0.5, slerp t 0.5, bf16 output.

    breadcrumbs_ties drops the top 1% as outliers (gamma 0.01), della uses epsilon 0.1,
    sce keeps every entry (select_topk 1, the default of both tools).
    """
    a, b = str(paths["ft_a"]), str(paths["ft_b"])
    if method == "linear":
        models = [{"model": m, "parameters": {"weight": 0.5}} for m in (a, b)]
        return {"merge_method": "linear", "models": models, "dtype": "bfloat16"}
    if method == "slerp":
        # mergekit's slerp interpolates from base_model (t=0) to the other model (t=1).
        return {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                "parameters": {"t": 0.5}, "dtype": "bfloat16"}
    if method in TASK_VECTOR_PARAMS:
        models = [{"model": m, "parameters": dict(TASK_VECTOR_PARAMS[method])} for m in (a, b)]
        return {"merge_method": method, "base_model": str(paths["base"]), "models": models,
                "dtype": "bfloat16"}
    if method in ("sce", "model_stock"):
        return {"merge_method": method, "base_model": str(paths["base"]), "models": [{"model": a}, {"model": b}],
                "dtype": "bfloat16"}
    if method in ("nuslerp", "multislerp"):
        models = [{"model": m, "parameters": {"weight": 0.5}} for m in (a, b)]
        return {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method == "karcher":
        return {"merge_method": "karcher", "models": [{"model": a}, {"model": b}], "dtype": "bfloat16"}
    if method in ("nearswap", "arcee_fusion"):
        # a base and one other model; nearswap's t as in MergeKit's example (QuartetAnemoi)
        extra = {"parameters": {"t": 0.0001}} if method == "nearswap" else {}
        return {"merge_method": method, "base_model": a, "models": [{"model": a}, {"model": b}], **extra,
                "dtype": "bfloat16"}
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def tool_command(tool: str, recipe: Path, out: Path, extra: list[str]) -> list[str]:
    """The command line of one merge. Both tools: CPU, quiet, one output shard at this size."""
    if tool == "mergekit":
        exe = Path(sys.executable).with_name("mergekit-yaml")
        # --out-shard-size counts parameters in mergekit (5B params = 10 GB in bf16).
        # No tokenizer exists to copy; without the flag mergekit tries to load one and warns.
        return [str(exe), str(recipe), str(out), "--out-shard-size", "5B", "--no-copy-tokenizer",
                "--random-seed", str(SEED), "--quiet", *extra]
    if tool == "mergelab":
        return [sys.executable, "-m", "mergelab.cli", "merge", str(recipe), str(out),
                "--device", "cpu", "--seed", str(SEED), "--out-shard-size", "5GB", "--quiet", *extra]
    raise ValueError(f"unknown tool {tool!r}")


def _anon_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:  # the process ended between listing and reading
            pass
    return total


def _tree(pid: int) -> list[int]:
    try:
        import psutil
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except Exception:  # psutil missing or the process already gone: the root alone
        return [pid]


def measure(cmd: list[str], env: dict[str, str], log: Path, poll_s: float = 0.05) -> dict:
    """Run cmd; return wall_s, max_rss_bytes (kernel high-water mark), peak_anon_bytes, rc."""
    peak = [0]
    with open(log, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll():
            while not done.is_set():
                peak[0] = max(peak[0], _anon_bytes(_tree(proc.pid)))
                done.wait(poll_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        # wait4 gives the child's rusage, which folds in its reaped descendants'.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "max_rss_bytes": usage.ru_maxrss * 1024, "peak_anon_bytes": peak[0],
            "rc": proc.returncode}


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_files(files: list[Path]) -> float:
    """Seconds to read every byte of files into one reused buffer."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t0


def write_floor(nbytes: int, folder: Path) -> tuple[float, float]:
    """(seconds with fsync, seconds until the last write returned) to write nbytes in chunks."""
    path = folder / "io_floor.bin"
    chunk = os.urandom(min(CHUNK, max(nbytes, 1)))
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(chunk[:left] if left < len(chunk) else chunk)
        buffered = time.perf_counter() - t0
        os.fsync(f.fileno())
    total = time.perf_counter() - t0
    path.unlink()
    return total, buffered


def io_floor(paths: dict[str, Path], out_dir: Path, repeats: int) -> dict:
    """Median read seconds per input checkpoint and write seconds of one output-sized file."""
    out_bytes = sum(p.stat().st_size for p in weight_files(paths["base"]))
    reads = {n: statistics.median(read_files(weight_files(p)) for _ in range(repeats))
             for n, p in paths.items()}
    writes = [write_floor(out_bytes, out_dir) for _ in range(repeats)]
    return {"read_s": reads, "write_fsync_s": statistics.median(w[0] for w in writes),
            "write_nofsync_s": statistics.median(w[1] for w in writes), "output_bytes": out_bytes,
            "input_bytes": {n: sum(f.stat().st_size for f in weight_files(p)) for n, p in paths.items()}}


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()  # flush the deleted output's writeback now, not during the next timed run


def _child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def run_all(args: argparse.Namespace, paths: dict[str, Path], work: Path, log=print,
            on_record=None) -> list[dict]:
    """Every (repeat, method, tool) run; one record each, outputs removed after each.

    on_record(records), when given, is called after every run (to save partial results).
    """
    tools = [t for t in TOOLS if not getattr(args, f"skip_{t}")]
    extra = {"mergekit": shlex.split(args.mergekit_args), "mergelab": shlex.split(args.mergelab_args)}
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    env, records = _child_env(), []
    for rep in range(args.repeats):
        for method in args.methods:
            recipe = work / "recipes" / f"{method}.yml"
            recipe.write_text(yaml.safe_dump(recipe_for(method, paths), sort_keys=False))
            # Alternate which tool goes first so neither always inherits the other's cache state.
            for tool in tools if rep % 2 == 0 else tools[::-1]:
                out = work / "outputs" / f"{method}-{tool}"
                _rmtree(out)
                cmd = tool_command(tool, recipe, out, extra[tool])
                logf = work / "logs" / f"{method}-{tool}-{rep}.log"
                rec = {"method": method, "tool": tool, "repeat": rep, "cmd": shlex.join(cmd),
                       "log": str(logf), **measure(cmd, env, logf)}
                rec["out_bytes"] = sum(f.stat().st_size for f in weight_files(out)) if out.exists() else 0
                if rec["rc"] != 0 or rec["out_bytes"] == 0:
                    rec["error"] = logf.read_text(errors="replace")[-2000:]
                log(f"{method:10s} {tool:9s} rep {rep}: rc {rec['rc']}, {rec['wall_s']:.2f} s, "
                    f"max RSS {rec['max_rss_bytes'] / 1e9:.2f} GB, anon {rec['peak_anon_bytes'] / 1e9:.2f} GB")
                records.append(rec)
                _rmtree(out)
                if on_record is not None:
                    on_record(records)
    return records


# ---- summary and reporting -------------------------------------------------

# "mk/ml": mergekit's number over mergelab's, on the mergelab row.
COLUMNS = ("method", "tool", "wall s", "peak RSS GB", "peak anon GB", "time mk/ml", "RSS mk/ml",
           "x I/O floor")


def _median(records: list[dict], key: str) -> float | None:
    return statistics.median(r[key] for r in records) if records else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(records: list[dict], floor: dict, inputs_of: dict[str, tuple[str, ...]]) -> list[dict]:
    """One row per (method, tool) that ran: medians over successful repeats, ratios, floor.

    The ratios mergekit/mergelab sit on the mergelab row (above 1: mergelab is
    faster / smaller). The floor of a method reads only the checkpoints it uses.
    """
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        floor_s = sum(floor["read_s"][n] for n in inputs_of[method]) + floor["write_fsync_s"]
        by_tool = {}
        for tool in TOOLS:
            mine = [r for r in records if r["method"] == method and r["tool"] == tool]
            if not mine:
                continue
            ok = [r for r in mine if r["rc"] == 0 and not r.get("error")]
            wall = _median(ok, "wall_s")
            by_tool[tool] = {
                "method": method, "tool": tool, "runs": len(ok), "failed": len(mine) - len(ok),
                "wall_s": wall, "max_rss_gb": _gb(_median(ok, "max_rss_bytes")),
                "peak_anon_gb": _gb(_median(ok, "peak_anon_bytes")), "floor_s": floor_s,
                "x_floor": _ratio(wall, floor_s), "time_ratio": None, "rss_ratio": None,
            }
        if len(by_tool) == 2:
            mk, ml = by_tool["mergekit"], by_tool["mergelab"]
            ml["time_ratio"] = _ratio(mk["wall_s"], ml["wall_s"])
            ml["rss_ratio"] = _ratio(mk["max_rss_gb"], ml["max_rss_gb"])
        rows += by_tool.values()
    return rows


def _gb(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 1e9


def _cells(row: dict) -> list[str]:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    wall = f(row["wall_s"], ".2f") if row["runs"] else "failed"
    if row["runs"] and row["failed"]:
        wall += f" ({row['failed']} failed)"
    return [row["method"], row["tool"], wall, f(row["max_rss_gb"], ".2f"), f(row["peak_anon_gb"], ".2f"),
            f(row["time_ratio"], ".2f"), f(row["rss_ratio"], ".2f"), f(row["x_floor"], ".2f")]


def render_markdown(rows: list[dict], meta: dict) -> str:
    """The results table with the settings it was measured under."""
    fl = meta["floor"]
    lines = [f"# mergelab vs MergeKit {meta['mergekit_version']} ({meta['size']})", "",
             f"{meta['when']}; {meta['machine']}; torch {meta['torch_version']}; "
             f"median of {meta['repeats']} run(s).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    reads = ", ".join(f"{n} {s:.3g} s" for n, s in fl["read_s"].items())
    lines += ["", f"Shape: {meta['spec']}; each checkpoint {fl['output_bytes'] / 1e9:.3g} GB bf16.",
              f"I/O floor: read from page cache {reads}; write {fl['output_bytes'] / 1e9:.3g} GB "
              f"{fl['write_fsync_s']:.3g} s with fsync ({fl['write_nofsync_s']:.3g} s before fsync). "
              "A method's floor reads only its inputs.",
              "Peak RSS: ru_maxrss of the subprocess tree (wait4); it includes mapped input pages. "
              "Peak anon: RssAnon summed over the tree, polled every 50 ms.",
              "mk/ml: mergekit's number over mergelab's; above 1, mergelab is faster / smaller.", "",
              "Commands:", ""]
    lines += [f"    {c}" for c in meta["commands"]]
    failures = [f"- {f['method']} {f['tool']} (repeat {f['repeat']}, rc {f['rc']}): {f['last_line']}"
                for f in meta["failures"]]
    if failures:
        lines += ["", "Failures (full output in the logs under the work dir):", "", *failures]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: wall time (with the I/O floor) and peak RSS per method and tool."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for k, tool in enumerate(TOOLS):
        mine = {r["method"]: r for r in rows if r["tool"] == tool}
        xs = [i + (k - 1) * width for i in range(len(methods))]
        ax_t.bar(xs, [(mine.get(m) or {}).get("wall_s") or 0 for m in methods], width, label=tool)
        ax_m.bar(xs, [(mine.get(m) or {}).get("max_rss_gb") or 0 for m in methods], width, label=tool)
    floors = [next(r["floor_s"] for r in rows if r["method"] == m) for m in methods]
    ax_t.bar([i + width for i in range(len(methods))], floors, width, label="I/O floor", color="grey")
    for ax, title in ((ax_t, "wall time (s)"), (ax_m, "peak RSS (GB)")):
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _meta(args: argparse.Namespace, spec: mc.LlamaSpec, floor: dict, records: list[dict]) -> dict:
    import dataclasses
    import datetime
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch
    try:
        mk_version = version("mergekit")
    except PackageNotFoundError:
        mk_version = "(not installed)"
    return {"when": datetime.datetime.now().isoformat(timespec="seconds"), "size": _family_name(args),
            "spec": dataclasses.asdict(spec), "repeats": args.repeats, "floor": floor,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
            "torch_version": torch.__version__, "mergekit_version": mk_version,
            "commands": list(dict.fromkeys(r["cmd"] for r in records if r["repeat"] == 0)),
            "failures": [{"method": r["method"], "tool": r["tool"], "repeat": r["repeat"], "rc": r["rc"],
                          "last_line": (r["error"].strip().splitlines() or ["(no output)"])[-1]}
                         for r in records if r.get("error")]}


def write_results(rows: list[dict], records: list[dict], floor: dict, args: argparse.Namespace,
                  spec: mc.LlamaSpec) -> dict:
    """Print the table with rich; write latest.md, latest.json and latest.png."""
    import json

    from rich.console import Console
    from rich.table import Table

    meta = _meta(args, spec, floor, records)
    table = Table(title=f"mergelab vs MergeKit ({_family_name(args)}, median of {args.repeats})")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("method", "tool") else "right")
    for row in rows:
        table.add_row(*_cells(row))
    Console().print(table)
    out = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(render_markdown(rows, meta))
    result = {"meta": meta, "rows": rows, "runs": records}
    (out / "latest.json").write_text(json.dumps(result, indent=2, default=str))
    plot(rows, out / "latest.png")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mergelab vs MergeKit: wall time and peak memory")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated subset of "
                   + ", ".join(METHODS) + f" (default: {', '.join(DEFAULT_METHODS)})")
    p.add_argument("--repeats", type=int, default=1, help="runs per (method, tool); the median is reported")
    p.add_argument("--work-dir", type=Path, default=REPO / "bench" / "_work",
                   help="inputs, recipes, logs and (transient) outputs")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results",
                   help="where latest.md, latest.json and latest.png go")
    p.add_argument("--size", choices=sorted(mc.SIZES), default="tinyllama",
                   help="tinyllama (1.1B, ~2.2 GB per checkpoint) or tiny (seconds)")
    p.add_argument("--layers", type=int, default=None,
                   help="override the preset's layer count (e.g. 4: TinyLlama's width, 307M parameters)")
    p.add_argument("--skip-mergekit", action="store_true", help="run mergelab only")
    p.add_argument("--skip-mergelab", action="store_true", help="run mergekit only")
    p.add_argument("--mergekit-args", default="", help="extra flags for mergekit-yaml, e.g. '--lazy-unpickle'")
    p.add_argument("--mergelab-args", default="", help="extra flags for mergelab merge")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: {', '.join(unknown) or 'none given'}; choose from {', '.join(METHODS)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.skip_mergekit and args.skip_mergelab:
        p.error("--skip-mergekit and --skip-mergelab together leave nothing to run")
    return args


def _spec(args: argparse.Namespace):
    import dataclasses

    spec, layers = mc.SIZES[args.size], getattr(args, "layers", None)
    return spec if layers is None else dataclasses.replace(spec, layers=layers)


def _family_name(args: argparse.Namespace) -> str:
    layers = getattr(args, "layers", None)
    return args.size if layers is None else f"{args.size}-{layers}layers"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = args.work_dir.resolve()
    paths = mc.make_family(work / "inputs" / _family_name(args), _spec(args),
                           shard_bytes=mc.parse_size(mc.DEFAULT_SHARD[args.size]))
    (work / "outputs").mkdir(parents=True, exist_ok=True)
    print("warming the page cache")
    read_files([f for p in paths.values() for f in weight_files(p)])
    floor = io_floor(paths, work / "outputs", args.repeats)
    print(f"I/O floor: read {', '.join(f'{n} {t:.2f} s' for n, t in floor['read_s'].items())}; "
          f"write+fsync {floor['write_fsync_s']:.2f} s (without fsync {floor['write_nofsync_s']:.2f} s)")

    def save_partial(records: list[dict]) -> None:
        # a long run keeps what it measured so far, if it is stopped before the end
        rows = summarize(records, floor, {m: METHODS[m] for m in args.methods})
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / "partial.md").write_text(render_markdown(rows, _meta(args, _spec(args), floor,
                                                                                 records)))

    records = run_all(args, paths, work, on_record=save_partial)
    rows = summarize(records, floor, {m: METHODS[m] for m in args.methods})
    return write_results(rows, records, floor, args, _spec(args))


if __name__ == "__main__":
    main()
