"""Can averaging constant-learning-rate checkpoints stand in for a learning-rate anneal?

A small GPT-style byte-level language model is trained on the Python standard
library's own sources (text every machine has), twice from the same
initialisation and data order: once at a constant learning rate, once with a
cosine decay to zero over the same number of steps. Checkpoints of the
constant run are saved every `save_every` steps into a run folder, and
averaged with mergelab's schemes (SMA, EMA, WSM) over several windows. The
script reports validation loss of: the constant run's last checkpoint, each
average, and the annealed run; and draws loss against step.

    python examples/averaging_vs_annealing.py               # full configuration (~10 min, 2 cores)
    python examples/averaging_vs_annealing.py --small       # a minute; what the tests run
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


def stdlib_bytes(limit: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for f in sorted(root.glob("*.py")):
        out += f.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, d: int = 128, layers: int = 4, heads: int = 4, ctx: int = 128):
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)
        self.ctx = ctx

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.embed(idx) + self.pos[:t]
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def batches(data: torch.Tensor, ctx: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ix = torch.randint(0, len(data) - ctx - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + ctx] for i in ix])
        y = torch.stack([data[i + 1:i + ctx + 1] for i in ix])
        yield x.long(), y.long()


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, ctx: int, n_batches: int = 8) -> float:
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
              for x, y in batches(val, ctx, 32, n_batches, seed=1234)]
    model.train()
    return sum(losses) / len(losses)


def train(cfg, train_data, val_data, schedule: str, save_dir: Path | None):
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg.d, cfg.layers, cfg.heads, cfg.ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    curve = []
    for step, (x, y) in enumerate(batches(train_data, cfg.ctx, cfg.batch, cfg.steps, cfg.seed), start=1):
        warm = min(1.0, step / cfg.warmup)
        decay = 1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * decay
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % cfg.save_every == 0 or step == cfg.steps:
            curve.append((step, evaluate(model, val_data, cfg.ctx)))
            if save_dir is not None:
                from safetensors.torch import save_file

                d = save_dir / f"checkpoint-{step}"
                d.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    return model, curve


def averaged_loss(cfg, run_dir: Path, val_data, scheme: str, last: int, **kw) -> float:
    from mergelab.trajectory.average import average_state_dict
    from mergelab.trajectory.run import plan_average

    chosen, weights, _ = plan_average(run_dir, scheme=scheme, last=last, **kw)
    model = TinyGPT(cfg.d, cfg.layers, cfg.heads, cfg.ctx)
    model.load_state_dict(average_state_dict(chosen, weights))  # the numbers `mergelab average` writes
    return evaluate(model, val_data, cfg.ctx)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a tiny configuration for tests")
    p.add_argument("--out", type=Path, default=Path("examples/_out/averaging"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = argparse.Namespace(d=128, layers=4, heads=4, ctx=128, batch=32, steps=1500, warmup=100, lr=2e-3,
                             save_every=50, seed=args.seed, text_bytes=3_000_000)
    if args.small:
        cfg.__dict__.update(d=32, layers=1, heads=2, ctx=32, batch=8, steps=60, warmup=5, save_every=10,
                            text_bytes=200_000)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    text = torch.frombuffer(bytearray(stdlib_bytes(cfg.text_bytes)), dtype=torch.uint8)
    split = int(0.9 * len(text))
    train_data, val_data = text[:split], text[split:]
    out = args.out
    run_dir = out / "constant_run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    start = time.perf_counter()
    _, const_curve = train(cfg, train_data, val_data, "constant", run_dir)
    _, cos_curve = train(cfg, train_data, val_data, "cosine", None)
    n_ckpt = len(const_curve)
    windows = sorted({w for w in (2, 4, 8, 16) if w <= n_ckpt})
    rows = [{"what": "constant LR, last checkpoint", "val_loss": const_curve[-1][1]},
            {"what": "cosine anneal, last checkpoint", "val_loss": cos_curve[-1][1]}]
    for w in windows:
        rows.append({"what": f"SMA of last {w}", "val_loss": averaged_loss(cfg, run_dir, val_data, "sma", w)})
        rows.append({"what": f"EMA (alpha 0.8) of last {w}",
                     "val_loss": averaged_loss(cfg, run_dir, val_data, "ema", w, alpha=0.8)})
        rows.append({"what": f"WSM 1-sqrt of last {w}",
                     "val_loss": averaged_loss(cfg, run_dir, val_data, "wsm", w, decay="1-sqrt")})
    result = {"config": vars(cfg), "seconds": time.perf_counter() - start, "rows": rows,
              "constant_curve": const_curve, "cosine_curve": cos_curve,
              "checkpoint_steps": [s for s, _ in const_curve]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _plot(result, windows, out / "averaging_vs_annealing.png")
    _print(rows, result["seconds"])
    return result


def _plot(result, windows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    s, l = zip(*result["constant_curve"])
    ax.plot(s, l, label="constant LR")
    s, l = zip(*result["cosine_curve"])
    ax.plot(s, l, label="cosine anneal")
    last = result["constant_curve"][-1][0]
    for row in result["rows"]:
        if row["what"].startswith("SMA"):
            ax.scatter([last], [row["val_loss"]], marker="x")
            ax.annotate(row["what"], (last, row["val_loss"]), fontsize=7, xytext=(-90, 0), textcoords="offset points")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    lo = min(r["val_loss"] for r in result["rows"])
    ax.set_ylim(lo - 0.1, lo + 1.0)
    ax.legend()
    ax.set_title("averaging constant-LR checkpoints vs annealing")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print(rows, seconds) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"validation loss ({seconds:.0f} s)")
    table.add_column("model")
    table.add_column("val loss", justify="right")
    for r in rows:
        table.add_row(r["what"], f"{r['val_loss']:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
