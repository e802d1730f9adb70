"""Side-by-side wall time and peak RSS of nuslerp / model_stock merges: mergelab (this checkout and,
optionally, another one) against mergekit-yaml, whole commands, alternating, several rounds.

    PYTHONPATH=src nice python bench/nuslerp_stock_speed.py --old /work/main/src --rounds 3 \\
        --models /tmp/tinyllama nuslerp nuslerp_base model_stock

--models holds base/, ft_a/ and ft_b/ (bench/make_checkpoints.py writes such sets); outputs go
to a private temporary folder. --fast runs one round with mergelab only (a smoke check).
Derived from the team's /tmp/methods_speed.py (same recipes, same command lines).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def recipes(root: Path) -> dict[str, dict]:
    base, a, b = (str(root / n) for n in ("base", "ft_a", "ft_b"))
    pair = [{"model": a, "parameters": {"weight": 0.4}}, {"model": b, "parameters": {"weight": 0.6}}]
    return {
        "nuslerp": {"merge_method": "nuslerp", "models": pair},
        "nuslerp_base": {"merge_method": "nuslerp", "base_model": base, "models": pair},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": a}, {"model": b}]},
    }


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float | None, str]:
    """(wall seconds, peak RSS in MB or None on failure, error tail) of one command under /usr/bin/time."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode:
        return dt, None, p.stderr[-300:]
    return dt, int(p.stderr.strip().splitlines()[-1]) / 1024, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=["nuslerp", "nuslerp_base", "model_stock"])
    ap.add_argument("--models", type=Path, default=Path("/tmp/tinyllama"))
    ap.add_argument("--old", help="src folder of a second mergelab checkout to time alongside")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fast", action="store_true", help="one round, mergelab (this checkout) only")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    tools = {"new": here} if args.fast else {"new": here, **({"old": args.old} if args.old else {}), "mergekit": None}
    rounds = 1 if args.fast else args.rounds
    work = Path(tempfile.mkdtemp(prefix="nuslerp_stock_speed_"))
    print(f"load average at start: {os.getloadavg()}", flush=True)
    try:
        for name in args.names:
            path = work / f"{name}.yml"
            path.write_text(yaml.safe_dump(dict(recipes(args.models)[name], dtype="bfloat16")))
            runs: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
            for r in range(rounds):
                order = list(tools) if r % 2 == 0 else list(tools)[::-1]  # alternate who goes first
                for tool in order:
                    out = work / f"out_{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    env = dict(os.environ)
                    if tool == "mergekit":
                        cmd = [str(Path(sys.executable).with_name("mergekit-yaml")), str(path), str(out),
                               "--no-copy-tokenizer", "--random-seed", "0", "--quiet", "--out-shard-size", "5B"]
                    else:
                        env["PYTHONPATH"] = tools[tool]
                        cmd = [sys.executable, "-m", "mergelab.cli", "merge", str(path), str(out), "--device", "cpu",
                               "--seed", "0", "--quiet"]
                    dt, rss, err = timed(cmd, env)
                    if rss is None:
                        raise SystemExit(f"{name} {tool} failed: {err}")
                    runs[tool].append((dt, rss))
                    print(f"  {name:13s} round {r} {tool:8s} {dt:6.2f} s  {rss:7.0f} MB", flush=True)
            med = {t: (statistics.median(d for d, _ in v), max(m for _, m in v)) for t, v in runs.items()}
            line = "  ".join(f"{t} {d:5.2f} s {m:5.0f} MB" for t, (d, m) in med.items())
            ratio = f"  mergekit/new {med['mergekit'][0] / med['new'][0]:.2f}x" if "mergekit" in med else ""
            print(f"{name:13s} median wall, max RSS: {line}{ratio}", flush=True)
        print(f"load average at end: {os.getloadavg()}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
