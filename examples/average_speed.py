"""`mergelab average` / `recover` before and after they became one engine pass: time and bytes read.

Makes a run folder of K checkpoints of a small transformer-shaped model
(float32, a trainer_state.json with a calm loss history), then runs each
command line in a child process under two source trees (e.g. the old code at
PYTHONPATH=/work/main/src and this checkout's src), alternating old and new,
several repeats. Each child counts the bytes the checkpoint reader hands out
(every Checkpoint.view/__getitem__: what the command reads, page cache or
disk) and reports its own wall time for the command (imports excluded) and
the process's total wall. The page cache is warm (the files are read once
before timing), so the times compare computation, not the disk.

    python examples/average_speed.py --old /work/main/src --new src --out /tmp/avg_speed
    python examples/average_speed.py --fast ...     # tiny model, one repeat (what a test may run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {  # name -> mergelab arguments after the run folder and output folder are filled in
    "average --scheme ema": ["average", "{run}", "{out}", "--scheme", "ema", "--alpha", "0.8", "--quiet"],
    "average --skip-unstable": ["average", "{run}", "{out}", "--skip-unstable", "--quiet"],
    "recover --last 3": ["recover", "{run}", "{out}", "--last", "3"],
}


def make_run(run: Path, k: int, *, vocab: int, width: int, layers: int, seed: int = 0) -> int:
    """K float32 checkpoints (checkpoint-100 ... ), each a small drift of the last; returns one's size in bytes."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, width), "model.norm.weight": (width,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (width, width), p + "self_attn.k_proj.weight": (width, width),
                   p + "self_attn.v_proj.weight": (width, width), p + "self_attn.o_proj.weight": (width, width),
                   p + "mlp.up_proj.weight": (4 * width, width), p + "mlp.down_proj.weight": (width, 4 * width),
                   p + "input_layernorm.weight": (width,)}
    theta = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    for j in range(k):
        theta = {n: t + 0.001 * torch.randn(t.shape, generator=g) for n, t in theta.items()}
        d = run / f"checkpoint-{(j + 1) * 100}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(theta, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    history = [{"step": s, "loss": 3.0 - s / 1e4} for s in range(10, (k + 1) * 100, 10)]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return sum(t.numel() * 4 for t in theta.values())


def child(args: list[str]) -> None:
    """Run one mergelab command in this process, counting the bytes the reader hands out; print JSON."""
    t0 = time.perf_counter()
    from mergelab.checkpoint.reader import Checkpoint
    from mergelab.cli.main import app

    counted = {"bytes": 0, "views": 0}
    view, getitem = Checkpoint.view, Checkpoint.__getitem__

    def spy_view(ck, name, rows=None):
        t = view(ck, name, rows)
        counted["bytes"] += t.numel() * t.element_size()
        counted["views"] += 1
        return t

    def spy_getitem(ck, name):
        t = getitem(ck, name)
        counted["bytes"] += t.numel() * t.element_size()
        return t

    Checkpoint.view, Checkpoint.__getitem__ = spy_view, spy_getitem
    imported = time.perf_counter()
    try:
        app(args, standalone_mode=False)
    finally:
        done = time.perf_counter()
        print(json.dumps({"command_s": done - imported, "import_s": imported - t0, **counted}))


def run_child(src: Path, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", "--", *args], env=env, capture_output=True,
                          text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{args} under {src} failed:\n{proc.stdout}\n{proc.stderr}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": wall}


def warm(run: Path) -> None:
    for f in run.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def plot(result: dict, path: Path) -> None:
    """Bars: median seconds and MB read per command, old vs new."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["command"] for s in result["summary"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "s", "seconds (median)"), (axes[1], "bytes", "MB read")):
        for i, code in enumerate(("old", "new")):
            values = [s[f"{code}_{key}"] / (1e6 if key == "bytes" else 1) for s in result["summary"]]
            ax.barh([j + 0.4 * i for j in range(len(names))], values, height=0.4, label=code)
        ax.set_yticks([j + 0.2 for j in range(len(names))], names)
        ax.set_xlabel(label)
    axes[0].legend()
    fig.suptitle(f"mergelab average/recover over {result['checkpoints']} checkpoints of "
                 f"{result['checkpoint_bytes'] / 1e6:.0f} MB, old loop vs engine pass")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", type=Path, required=True, help="src folder of the code before")
    p.add_argument("--new", type=Path, required=True, help="src folder of the code after")
    p.add_argument("--out", type=Path, default=Path("examples/_out/average_speed"))
    p.add_argument("--checkpoints", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fast", action="store_true", help="a tiny model and one repeat")
    p.add_argument("--plot", type=Path, help="write the bar chart here (PNG)")
    args = p.parse_args(argv)
    vocab, width, layers = (8000, 512, 6) if not args.fast else (100, 16, 1)
    repeats = 1 if args.fast else args.repeats
    run = args.out / "run"
    if not run.exists():
        size = make_run(run, args.checkpoints, vocab=vocab, width=width, layers=layers)
    else:
        size = sum(f.stat().st_size for f in run.glob("checkpoint-100/*.safetensors"))
    warm(run)
    for src in (args.old, args.new):  # numba's cache loaded, imports compiled: not timed
        run_child(src, [a.format(run=run, out=args.out / "out-warmup") for a in COMMANDS["average --scheme ema"]]
                  + (["--overwrite"] if (args.out / "out-warmup").exists() else []))
    rows = []
    for name, template in COMMANDS.items():
        for rep in range(repeats):
            for label, src in (("old", args.old), ("new", args.new)) if rep % 2 == 0 else \
                    (("new", args.new), ("old", args.old)):
                out = args.out / f"out-{label}"
                cmd = [a.format(run=run, out=out) for a in template] + (["--overwrite"] if out.exists() else [])
                r = run_child(src, cmd)
                rows.append({"command": name, "code": label, "repeat": rep, **r})
                print(f"{name:28s} {label}  {r['command_s']:7.2f} s  {r['bytes'] / 1e6:8.1f} MB read",
                      flush=True)
    summary = []
    for name in COMMANDS:
        entry = {"command": name}
        for label in ("old", "new"):
            mine = [r for r in rows if r["command"] == name and r["code"] == label]
            entry[f"{label}_s"] = statistics.median(r["command_s"] for r in mine)
            entry[f"{label}_bytes"] = mine[0]["bytes"]
        summary.append(entry)
    result = {"checkpoints": args.checkpoints, "checkpoint_bytes": size, "repeats": repeats,
              "load": os.getloadavg(), "rows": rows, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "average_speed.json").write_text(json.dumps(result, indent=2))
    for s in summary:
        print(f"{s['command']:28s} old {s['old_s']:6.2f} s {s['old_bytes'] / 1e6:8.1f} MB | "
              f"new {s['new_s']:6.2f} s {s['new_bytes'] / 1e6:8.1f} MB | {s['old_s'] / s['new_s']:.2f}x")
    print("load average:", os.getloadavg())
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
    else:
        main()
