"""Communication-efficient data parallelism: DiLoCo and friends against synchronous data parallel.

The byte-level GPT of examples/averaging_vs_annealing.py is trained on the
Python standard library's own sources by 4 gloo worker processes on this
machine, every variant on the same total number of tokens (each worker sees its
own stream of batches):

    sync DP           torch DistributedDataParallel, gradients all-reduced every step
    FedAvg H=50       DiLoCo with outer SGD(lr=1)
    DiLoCo H=10/50/200  outer SGD(lr=0.7, momentum=0.9, Nesterov)
    DiLoCo ties / optimizer_aware   H=50, the outer step a mergelab merge of the pseudo-gradients
    Streaming DiLoCo  4 fragments, H=48 (a fragment every 12 steps), tau=2 overlapped steps, int4
    SPARTA 0.5%       0.5% of the parameters averaged after every step
    single worker     one process, 4x the steps (the same tokens)

For each: validation loss, payload bytes each worker handed to collectives
(and a ring algorithm's wire bytes), peak bytes per sync, wall time. Then the
cost of one DiLoCo sync of a bigger model against a bare all_reduce of the
same bytes. Writes results.json, a table (results.md) and a PNG.

    python examples/diloco_vs_ddp.py              # ~10 minutes on 2 shared CPU cores
    python examples/diloco_vs_ddp.py --fast       # seconds
    python examples/diloco_vs_ddp.py --warm-start 300 --variants "sync DP,DiLoCo H=50,single worker"
                                                  # every variant from the same sync-DP checkpoint
    python examples/diloco_vs_ddp.py --overhead-only --overhead-params 124e6   # cost of one sync
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from averaging_vs_annealing import TinyGPT, batches, evaluate, stdlib_bytes  # noqa: E402

FULL = dict(d=64, layers=2, heads=2, ctx=64, batch=8, steps=600, lr=2e-3, warmup=30, text_bytes=2_000_000,
            H=(10, 50, 200), Hs=48, overhead_params=16_000_000)
FAST = dict(d=16, layers=2, heads=2, ctx=16, batch=4, steps=24, lr=2e-3, warmup=2, text_bytes=100_000,
            H=(2, 4, 8), Hs=8, overhead_params=100_000)


def variants(c):
    h10, h50, h200 = c["H"]
    nest = dict(lr=0.7, momentum=0.9, nesterov=True)
    return [
        ("sync DP", "ddp", {}),
        (f"FedAvg H={h50}", "diloco", dict(H=h50, outer=dict(lr=1.0))),
        (f"DiLoCo H={h10}", "diloco", dict(H=h10, outer=nest)),
        (f"DiLoCo H={h50}", "diloco", dict(H=h50, outer=nest)),
        (f"DiLoCo H={h200}", "diloco", dict(H=h200, outer=nest)),
        (f"DiLoCo H={h50} ties", "diloco", dict(H=h50, outer=nest, outer_merge="ties",
                                               merge_params={"density": 0.5})),
        (f"DiLoCo H={h50} optimizer_aware", "diloco", dict(H=h50, outer=nest, outer_merge="optimizer_aware")),
        (f"Streaming DiLoCo H={c['Hs']} 4 frag int4", "streaming", dict(H=c["Hs"], outer=nest)),
        ("SPARTA 0.5%", "sparta", dict(fraction=0.005)),
        ("single worker", "single", {}),
    ] + [(f"DiLoCo H={h50} outer lr {lr:g}", "diloco", dict(H=h50, outer=dict(nest, lr=lr)))
         for lr in c.get("outer_lrs", [])]


def selected_variants(c):
    """variants(c), restricted to the names in c["only"] (in the order given) when set."""
    vs = variants(c)
    if not c.get("only"):
        return vs
    by_name = {v[0]: v for v in vs}
    missing = [n for n in c["only"] if n not in by_name]
    if missing:
        raise SystemExit(f"unknown variant(s) {missing}; choose from: {', '.join(by_name)}")
    return [by_name[n] for n in c["only"]]


def _model(c):
    torch.manual_seed(0)  # the same initial model everywhere (DiLoCo also broadcasts rank 0's)
    return TinyGPT(c["d"], c["layers"], c["heads"], c["ctx"])


def _inner(model, c):
    return torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.01, betas=(0.9, 0.95))


def _fragments(model):
    """4 fragments of the tiny GPT: embeddings, each block, final norm + head (neighbours joined
    until there are 4)."""
    frags = [[model.embed.weight, model.pos]] + [list(b.parameters()) for b in model.blocks]
    frags.append(list(model.ln.parameters()) + list(model.head.parameters()))
    while len(frags) > 4:
        frags[-2] += frags.pop()
    return frags


def _train_loop(model, inner, c, data, rank, steps, batch, progress=None, *, seed=None, start_step=None):
    """steps AdamW steps (linear lr warm-up, then constant) on this rank's stream of batches; after a
    warm start the step count (for the warm-up) goes on from it and the batches come from a new stream."""
    if seed is None:
        seed = 1000 + rank if not c.get("warm_start") else 3000 + rank
    if start_step is None:
        start_step = c.get("warm_start", 0) + 1
    for step, (x, y) in enumerate(batches(data, c["ctx"], batch, steps, seed=seed), start=start_step):
        for g in inner.param_groups:
            g["lr"] = c["lr"] * min(1.0, step / c["warmup"])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        inner.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        inner.step()
        if progress is not None:
            progress()


def warm_start(c, train, val, rank, world, out_dir):
    """c["warm_start"] steps of synchronous data parallel (torch DDP) from the initial model: the
    checkpoint (model and AdamW state, identical on every rank) all variants continue from."""
    model = _model(c)
    inner = _inner(model, c)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    t0 = time.perf_counter()
    _train_loop(ddp, inner, c, train, rank, c["warm_start"], c["batch"], seed=1000 + rank, start_step=1)
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "inner": copy.deepcopy(inner.state_dict())}
    info = {"steps": c["warm_start"], "wall_seconds": time.perf_counter() - t0,
            "val_loss": evaluate(model, val, c["ctx"]) if rank == 0 else float("nan")}
    if rank == 0:
        tmp = Path(out_dir) / "warm_start.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, Path(out_dir) / "warm_start.pt")
    dist.barrier()
    return state, info


def run_variant(name, kind, kw, c, train, val, rank, world, progress, warm=None):
    from mergelab.distributed import SPARTA, DiLoCo

    model = _model(c)
    inner = _inner(model, c)
    if warm is not None:  # every variant continues from the same warm-started model and optimizer
        model.load_state_dict(warm["model"])
        inner.load_state_dict(copy.deepcopy(warm["inner"]))
    dist.barrier()
    t0 = time.perf_counter()
    rep: dict = {}
    if kind == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        counted = {"payload": 0}

        def hook(state, bucket):  # counts the gradient buckets DDP all-reduces
            buf = bucket.buffer()
            counted["payload"] += buf.numel() * buf.element_size()
            buf.div_(world)
            return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, hook)
        _train_loop(ddp, inner, c, train, rank, c["steps"], c["batch"], progress)
        per_step = counted["payload"] / c["steps"]
        rep = {"payload_bytes": counted["payload"], "wire_bytes": counted["payload"] * 2 * (world - 1) / world,
               "peak_sync_payload_bytes": per_step, "syncs": c["steps"]}
        eval_model = model
    elif kind == "single":
        if rank == 0:
            _train_loop(model, inner, c, train, rank, c["steps"] * world, c["batch"], progress)
        rep = {"payload_bytes": 0, "wire_bytes": 0, "peak_sync_payload_bytes": 0, "syncs": 0}
        eval_model = model
    elif kind == "sparta":
        with SPARTA(model, inner, fraction=kw["fraction"]) as s:
            _train_loop(model, inner, c, train, rank, c["steps"], c["batch"], progress)
        rep = s.stats.as_dict()
        with torch.no_grad():  # evaluate the workers' average (one final all-reduce, not counted)
            for p in model.parameters():
                dist.all_reduce(p.data)
                p.data /= world
        eval_model = model
    else:
        outer = torch.optim.SGD(model.parameters(), **kw["outer"])
        extra = dict(outer_merge=kw.get("outer_merge", "mean"), merge_params=kw.get("merge_params"))
        if kind == "streaming":
            extra.update(model_fragments=_fragments(model), fragment_sync_delay=min(2, kw["H"] // 4 - 1),
                         quantize="int4")
        with DiLoCo(model, inner, outer, sync_every=kw["H"], **extra) as d:
            _train_loop(model, inner, c, train, rank, c["steps"], c["batch"], progress)
        rep = d.report()
        model.load_state_dict(d.global_state_dict())
        eval_model = model
    dist.barrier()
    wall = time.perf_counter() - t0
    loss = evaluate(eval_model, val, c["ctx"]) if rank == 0 else float("nan")
    return {"variant": name, "val_loss": loss, "wall_seconds": wall,
            **{k: rep.get(k) for k in ("payload_bytes", "wire_bytes", "peak_sync_payload_bytes", "syncs",
                                       "comm_seconds")}}


def sync_overhead(c, rank, world, repeats=7):
    """One DiLoCo sync (pseudo-gradients, bucketed all-reduce, outer Nesterov step, copy into the model)
    of a model of `overhead_params` float32 parameters, against a bare all_reduce of the same bytes in
    the same 25 MB buckets (async, all in flight at once) and in one call; interleaved, medians."""
    from mergelab.distributed import DiLoCo

    n = c["overhead_params"]
    width = min(4096, int(math.sqrt(n)))
    layers = [torch.nn.Linear(width, width, bias=False) for _ in range(max(1, n // width**2))]
    rest = n - len(layers) * width**2
    if rest >= width:  # the rest as a narrower layer: n parameters (to within a row) in all
        layers.append(torch.nn.Linear(width, rest // width, bias=False))
    model = torch.nn.Sequential(*layers)
    numel = sum(p.numel() for p in model.parameters())
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    d = DiLoCo(model, inner, outer, sync_every=1)
    flat = torch.randn(numel)
    cap = 25 * 2**20 // 4
    buckets = list(flat.split(cap))
    bare, bucketed, syncs, prep = [], [], [], []
    for i in range(repeats + 1):  # the first round warms up (allocations, gloo's buffers); not counted
        with torch.no_grad():  # a worker's local model differs from the global one, as after inner steps
            for p in model.parameters():
                p.mul_(1.0 + 1e-3 * (rank + 1))
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        for w in [dist.all_reduce(b, async_op=True) for b in buckets]:
            w.wait()
        t3 = time.perf_counter()
        dist.barrier()
        t4 = time.perf_counter()
        d._prepare(0)
        t45 = time.perf_counter()
        d._perform(0)
        t5 = time.perf_counter()
        if i:
            prep.append(t45 - t4)
            bare.append(t1 - t0)
            bucketed.append(t3 - t2)
            syncs.append(t5 - t4)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"params": numel, "bytes": numel * 4, "buckets": len(buckets), "repeats": repeats,
            "threads": torch.get_num_threads(), "bare_all_reduce_s": med(bare),
            "bare_bucketed_all_reduce_s": med(bucketed), "diloco_sync_s": med(syncs),
            "prepare_s": med(prep),
            "samples": {"bare": bare, "bucketed": bucketed, "sync": syncs, "prepare": prep}}


def worker(rank, world, port, cfg_json, out):
    c = json.loads(cfg_json)
    # one thread per worker process, for torch and for mergelab's numba kernels (the outer merges):
    # 4 workers on 2 cores with a thread pool each spend their time waiting on one another
    # (more cores than workers: each gets its share)
    threads = max(1, len(os.sched_getaffinity(0)) // world)
    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    text = torch.frombuffer(bytearray(stdlib_bytes(c["text_bytes"])), dtype=torch.uint8)
    split = int(0.9 * len(text))
    train, val = text[:split], text[split:]
    results = []
    vs = selected_variants(c)
    progress_bar = None
    if rank == 0 and not c.get("quiet"):
        from rich.progress import Progress

        progress_bar = Progress()
        progress_bar.start()
    warm, warm_info = None, None
    if c.get("warm_start") and not c.get("overhead_only"):
        if rank == 0 and c.get("quiet"):
            print(f"warm start: {c['warm_start']} steps of sync DP", flush=True)
        warm, warm_info = warm_start(c, train, val, rank, world, Path(out).parent)
        if rank == 0 and c.get("quiet"):
            print(f"warm start: loss {warm_info['val_loss']:.4f}, {warm_info['wall_seconds']:.1f} s", flush=True)
    try:
        for name, kind, kw in ([] if c.get("overhead_only") else vs):
            tick = None
            if progress_bar is not None:
                total = c["steps"] * (world if kind == "single" else 1)
                task = progress_bar.add_task(name, total=total)
                tick = lambda task=task: progress_bar.advance(task)  # noqa: E731
            results.append(run_variant(name, kind, kw, c, train, val, rank, world, tick, warm))
            if rank == 0:
                Path(out).with_suffix(".partial.json").write_text(json.dumps(results, indent=2))
                if c.get("quiet"):
                    print(f"{name}: loss {results[-1]['val_loss']:.4f}, {results[-1]['wall_seconds']:.1f} s", flush=True)
        overhead = sync_overhead(c, rank, world) if not c.get("skip_overhead") else None
    finally:
        if progress_bar is not None:
            progress_bar.stop()
    if rank == 0:
        Path(out).write_text(json.dumps({"config": c, "world": world, "warm_start": warm_info, "results": results,
                                         "overhead": overhead}, indent=2))
    dist.destroy_process_group()


def quant_sweep(c, world: int, steps: int) -> list[dict]:
    """Streaming DiLoCo (4 fragments) with each pseudo-gradient format, workers simulated as threads
    of this process (simulate_workers gives the numbers n processes would)."""
    import copy

    from mergelab.distributed import DiLoCo, simulate_workers

    torch.set_num_threads(1)
    text = torch.frombuffer(bytearray(stdlib_bytes(c["text_bytes"])), dtype=torch.uint8)
    split = int(0.9 * len(text))
    train, val = text[:split], text[split:]
    init = _model(c)  # built once: threads share torch's global RNG
    out = []
    for q in ("none", "bf16", "fp8", "int4"):
        def work(rank, n, q=q):
            model = copy.deepcopy(init)
            inner = _inner(model, c)
            outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
            with DiLoCo(model, inner, outer, sync_every=c["Hs"], model_fragments=_fragments(model),
                        fragment_sync_delay=min(2, c["Hs"] // 4 - 1), quantize=q) as d:
                _train_loop(model, inner, c, train, rank, steps, c["batch"])
            model.load_state_dict(d.global_state_dict())
            return evaluate(model, val, c["ctx"]) if rank == 0 else None, d.report()
        t0 = time.perf_counter()
        loss, rep = simulate_workers(world, work)[0]
        out.append({"quantize": q, "val_loss": loss, "payload_bytes": rep["payload_bytes"],
                    "peak_sync_payload_bytes": rep["peak_sync_payload_bytes"],
                    "wall_seconds": time.perf_counter() - t0})
        print(out[-1], flush=True)
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(c, world, out: Path, timeout: float) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(world, _port(), json.dumps(c), str(out)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=2.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers did not finish in {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return json.loads(out.read_text())


def table(res: dict) -> str:
    rows = res["results"]
    ddp = next((r for r in rows if r["variant"] == "sync DP"), rows[0])
    lines = ["| variant | val loss | vs sync DP | bytes sent / worker | fewer bytes than sync DP | peak bytes / sync | syncs | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fewer = f"{ddp['payload_bytes'] / r['payload_bytes']:.0f}x" if r["payload_bytes"] else "-"
        lines.append(f"| {r['variant']} | {r['val_loss']:.4f} | {100 * (r['val_loss'] / ddp['val_loss'] - 1):+.1f}% | "
                     f"{r['payload_bytes'] / 1e6:.2f} MB | {fewer} | {r['peak_sync_payload_bytes'] / 1e3:.1f} kB | "
                     f"{r['syncs']} | {r['wall_seconds']:.1f} |")
    w = res.get("warm_start")
    if w:
        lines += ["", f"All variants continued from the same checkpoint: {w['steps']} steps of sync DP "
                      f"(validation loss {w['val_loss']:.4f}, {w['wall_seconds']:.1f} s)."]
    o = res.get("overhead")
    if not o:
        return "\n".join(lines)
    lines += ["", f"Sync overhead ({o['params'] / 1e6:.1f}M float32 parameters, {res['world']} gloo workers): "
              f"DiLoCo sync {o['diloco_sync_s']:.3f} s, bare all_reduce of the same bytes in the same buckets "
              f"{o['bare_bucketed_all_reduce_s']:.3f} s (ratio {o['diloco_sync_s'] / o['bare_bucketed_all_reduce_s']:.2f}x), "
              f"in one call {o['bare_all_reduce_s']:.3f} s (ratio {o['diloco_sync_s'] / o['bare_all_reduce_s']:.2f}x)."]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["results"] if r["payload_bytes"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["payload_bytes"] / 1e6, r["val_loss"])
        ax.annotate(r["variant"], (r["payload_bytes"] / 1e6, r["val_loss"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    single = next((r for r in res["results"] if r["variant"] == "single worker"), None)
    if single is not None:
        ax.axhline(single["val_loss"], color="grey", ls="--", lw=1, label="single worker (same tokens)")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("MB each worker handed to collectives (log)")
    ax.set_ylabel("validation loss (nats/byte)")
    warm = res.get("warm_start")
    ax.set_title(f"{res['world']} gloo workers, byte-level GPT, same tokens per variant"
                 + (f"\nafter a warm start of {warm['steps']} sync DP steps" if warm else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="a tiny configuration for tests")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("examples/_out/diloco"))
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default OUT/diloco_vs_ddp.png)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--overhead-only", action="store_true", help="only the sync-overhead measurement")
    p.add_argument("--no-overhead", action="store_true", help="skip the sync-overhead measurement")
    p.add_argument("--warm-start", type=int, default=0, metavar="STEPS",
                   help="first STEPS steps of sync DP on every worker; every variant (sync DP and the single "
                        "worker too) continues from that model and optimizer state, with the same token budget "
                        "after it as without")
    p.add_argument("--steps", type=int, default=None, help="inner steps per worker after the warm start "
                   "(default 600; --fast 24)")
    p.add_argument("--outer-lrs", default="", help="also DiLoCo H=50 with these outer learning rates, "
                   "e.g. 0.4,1.0 (0.7 is in the default variants)")
    p.add_argument("--variants", default="", help="run only these variants, comma-separated names "
                   "(e.g. 'sync DP,DiLoCo H=50,single worker')")
    p.add_argument("--overhead-params", type=float, default=None,
                   help="model size of the overhead measurement, e.g. 124e6 (default 16e6; --fast 1e5)")
    p.add_argument("--quant-sweep", type=int, default=0, metavar="STEPS",
                   help="instead: Streaming DiLoCo with none/bf16/fp8/int4 pseudo-gradients for STEPS steps "
                        "(simulated workers); writes OUT/quant.json")
    args = p.parse_args(argv)
    c = dict(FAST if args.fast else FULL, quiet=args.quiet, overhead_only=args.overhead_only)
    if args.overhead_params:
        c["overhead_params"] = int(args.overhead_params)
    if args.steps:
        c["steps"] = args.steps
    c.update(warm_start=args.warm_start, skip_overhead=args.no_overhead,
             outer_lrs=[float(x) for x in args.outer_lrs.split(",") if x.strip()],
             only=[x.strip() for x in args.variants.split(",") if x.strip()])
    selected_variants(c)  # unknown names fail here, before any process starts
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quant_sweep:
        rows = quant_sweep(c, args.workers, args.quant_sweep)
        (args.out / "quant.json").write_text(json.dumps({"config": c, "steps": args.quant_sweep, "rows": rows},
                                                        indent=2))
        return {"quant": rows}
    if args.overhead_only:
        res = launch(c, args.workers, args.out / "overhead.json", args.timeout)
        print(res["overhead"])
        return res
    res = launch(c, args.workers, args.out / "results.json", args.timeout)
    md = table(res)
    (args.out / "results.md").write_text(md + "\n")
    plot(res, args.plot or args.out / "diloco_vs_ddp.png")
    print(md)
    return res


if __name__ == "__main__":
    main()
