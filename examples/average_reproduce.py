"""Do docs/results.md §3's averages come out the same through the engine as through the old streaming loop?

Trains the §3 byte-level GPT (examples/averaging_vs_annealing.py, same shape)
at a constant learning rate for a short run, saving 16 checkpoints, then
computes §3's twelve averages (SMA, EMA alpha 0.8, WSM 1-sqrt over the last
2, 4, 8 and 16 checkpoints) under two source trees in child processes: the
old code (trajectory.average.average_tensor, its own float32 loop) and the
new (trajectory.average.average_state_dict, an engine plan). Reports, per
average, how many elements differ and by how many float32 ulps, and both
validation losses.

    python examples/average_reproduce.py --old /work/main/src --new src --out /tmp/avg_repro
    python examples/average_reproduce.py --old ... --new ... --steps 16 --save-every 2   # 8 checkpoints, quicker
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

AVERAGES = [(scheme, w, kw) for w in (2, 4, 8, 16)
            for scheme, kw in (("sma", {}), ("ema", {"alpha": 0.8}), ("wsm", {"decay": "1-sqrt"}))]
EXAMPLE = Path(__file__).resolve().parent / "averaging_vs_annealing.py"


def _example():
    spec = importlib.util.spec_from_file_location("averaging_vs_annealing", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def child(run_dir: Path, out: Path) -> None:
    """Every average with whichever API this source tree has; saved as one .pt file."""
    from mergelab.checkpoint.reader import Checkpoint
    from mergelab.trajectory import average
    from mergelab.trajectory.run import plan_average

    result = {}
    available = len(list(run_dir.glob("checkpoint-*")))
    for scheme, w, kw in AVERAGES:
        if w > available:  # a short run: the windows it has
            continue
        chosen, weights, _ = plan_average(run_dir, scheme=scheme, last=w, **kw)
        if hasattr(average, "average_state_dict"):
            sd = average.average_state_dict(chosen, weights)
        else:  # the old loop, as examples/averaging_vs_annealing.py called it
            ckpts = [Checkpoint(c.path) for c in chosen]
            labels = [str(c.path) for c in chosen]
            sd = {k: average.average_tensor([ck.view(k) for ck in ckpts], weights, k, labels)
                  for k in ckpts[-1].keys()}
        result[f"{scheme} last {w}"] = {k: v.clone() for k, v in sd.items()}
    torch.save(result, out)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 units in the last place between two float32 tensors (entry by entry;
    large where an entry is a near-cancelling sum, tiny beside its terms)."""
    ia, ib = a.contiguous().view(torch.int32).long(), b.contiguous().view(torch.int32).long()
    # map the sign-magnitude bit patterns onto a monotone integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", type=Path, required=True)
    p.add_argument("--new", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("examples/_out/average_reproduce"))
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--save-every", type=int, default=10)
    args = p.parse_args(argv)
    mod = _example()
    cfg = argparse.Namespace(d=128, layers=4, heads=4, ctx=128, batch=32, steps=args.steps, warmup=10, lr=2e-3,
                             save_every=args.save_every, seed=0, text_bytes=3_000_000)
    text = torch.frombuffer(bytearray(mod.stdlib_bytes(cfg.text_bytes)), dtype=torch.uint8)
    split = int(0.9 * len(text))
    train_data, val_data = text[:split], text[split:]
    run_dir = args.out / "constant_run"
    if not run_dir.exists():
        mod.train(cfg, train_data, val_data, "constant", run_dir)
    files = {}
    for label, src in (("old", args.old), ("new", args.new)):
        files[label] = args.out / f"averages-{label}.pt"
        env = {**os.environ, "PYTHONPATH": str(src.resolve())}
        subprocess.run([sys.executable, __file__, "--child", str(run_dir), str(files[label])], env=env, check=True,
                       timeout=1800)
    old, new = (torch.load(files[k]) for k in ("old", "new"))
    rows = []
    model = mod.TinyGPT(cfg.d, cfg.layers, cfg.heads, cfg.ctx)
    for name in old:
        differ = sum(int((old[name][k] != new[name][k]).sum()) for k in old[name])
        total = sum(v.numel() for v in old[name].values())
        worst = max(ulps(old[name][k], new[name][k]) for k in old[name])
        # the same difference measured against each tensor's scale: ulps of its largest entry
        scaled = max(float((old[name][k] - new[name][k]).abs().max())
                     / (torch.finfo(torch.float32).eps * max(float(old[name][k].abs().max()), 1e-30))
                     for k in old[name])
        losses = []
        for sd in (old[name], new[name]):
            model.load_state_dict(sd)
            losses.append(mod.evaluate(model, val_data, cfg.ctx))
        rows.append({"average": name, "elements_differing": differ, "elements": total, "max_ulps": worst,
                     "max_diff_in_ulps_of_largest_entry": scaled,
                     "val_loss_old": losses[0], "val_loss_new": losses[1]})
        print(f"{name:14s} {differ:8d} of {total} differ (max {worst} ulp of the entry, {scaled:.2f} of the "
              f"tensor's largest)  val loss old {losses[0]:.6f} "
              f"new {losses[1]:.6f}", flush=True)
    (args.out / "average_reproduce.json").write_text(json.dumps({"config": vars(cfg), "rows": rows}, indent=2))
    return {"rows": rows}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
