"""How close `inspect` runs to the I/O floor: read time and inspect time, measured in one run.

The floor is reading every tensor `inspect` analyses, through the same reader
(mergelab.checkpoint.Checkpoint), into memory and dropping it: what any tool must
pay to see the weights. With --warm the files are read once first, so both
numbers are from the page cache and the timed inspect is a second call. Wall and
CPU seconds are reported, and the ratio inspect / read. Only `inspect_models(models,
base)` is called, so an older checkout runs it too (PYTHONPATH=old/src) for a
before/after comparison.

    python examples/inspect_speed.py bench/_work/inputs/tinyllama/ft_a bench/_work/inputs/tinyllama/ft_b \
        --base bench/_work/inputs/tinyllama/base --warm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def read_all(paths: list[Path]) -> int:
    """Read every tensor of every checkpoint once; returns the bytes read."""
    from mergelab.checkpoint.reader import Checkpoint

    total = 0
    for path in paths:
        with Checkpoint(path) as ck:
            for name in ck:
                total += ck[name].numel() * ck.dtype(name).itemsize
    return total


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--base", type=Path)
    parser.add_argument("--warm", action="store_true", help="read the files and run inspect once before timing "
                        "(page cache filled, numba compiled or loaded from its cache)")
    parser.add_argument("--spectral-layers", type=int, default=None, help="default: inspect's own default")
    parser.add_argument("--json", type=Path, help="also write the timings here")
    parser.add_argument("--cli", type=int, default=0, help="also time this many runs of `mergelab inspect`")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    from mergelab.analysis import inspect_models

    import_s = time.perf_counter() - start

    paths = [*args.models, *([args.base] if args.base else [])]
    if args.warm:
        read_all(paths)
    nbytes, read_wall, read_cpu = timed(read_all, paths)
    kwargs = {} if args.spectral_layers is None else {"spectral_layers": args.spectral_layers}
    first = None
    if args.warm:
        _, first, _ = timed(inspect_models, args.models, args.base, **kwargs)
    _, wall, cpu = timed(inspect_models, args.models, args.base, **kwargs)
    result = {"bytes": nbytes, "read_wall_s": read_wall, "read_cpu_s": read_cpu, "inspect_wall_s": wall,
              "inspect_cpu_s": cpu, "ratio_wall": wall / read_wall, "ratio_cpu": cpu / max(read_cpu, 1e-9),
              "import_s": import_s, "first_call_s": first, "load_average": os.getloadavg()}
    print(f"read {nbytes / 1e9:.2f} GB: {read_wall:.2f} s wall ({read_cpu:.2f} s CPU); inspect: {wall:.2f} s "
          f"wall ({cpu:.2f} s CPU); inspect / read = {wall / read_wall:.2f} (wall), "
          f"{result['ratio_cpu']:.2f} (CPU); import {import_s:.2f} s"
          + (f", first call {first:.2f} s" if first is not None else ""))
    if args.cli:
        command = [sys.executable, "-m", "mergelab.cli", "inspect", *map(str, args.models), "--quiet",
                   *(["--base", str(args.base)] if args.base else []),
                   *(["--spectral-layers", str(args.spectral_layers)] if args.spectral_layers is not None else [])]
        walls = []
        for _ in range(args.cli):
            begin = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=os.environ)
            walls.append(time.perf_counter() - begin)
        result["cli_wall_s"] = walls
        print("`mergelab inspect` end to end: " + ", ".join(f"{w:.2f}" for w in walls) + " s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
