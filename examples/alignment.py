"""Merging models trained apart: barriers before and after permutation alignment, REPAIR, ZipIt.

    python examples/alignment.py            # the full run behind docs/results-alignment.md
    python examples/alignment.py --fast     # a reduced run (widths x1, x2; fewer steps)

Data: MNIST-1D (Greydanus, 2020), generated locally by the `mnist1d` package (4000
train / 1000 test signals of length 40, 10 classes); scikit-learn's digits if it is
missing. Text: characters of the Python standard library's own sources.

1. MLPs (3 hidden layers of 64 x m units) and a ResNet-style 1-D CNN with BatchNorm
   (8 x m channels) at width multipliers m = 1, 2, 4, 8 (CNN: 1, 2, 4), two seeds each: test loss and
   accuracy along the linear path A -> B, unaligned / weight matching / activation
   matching, each without and with REPAIR (applied at every point of the path).
2. Two tiny Llama-style causal LMs (rotary, grouped-query attention) from different
   seeds: loss along the path, unaligned / weight matching / activation matching.
3. ZipIt on two MLPs trained on disjoint halves of the classes vs permute-and-average.
4. Speed: weight matching of the 3 x 512 MLP and of a MiniLM-sized BERT (6 x 384),
   and the `rebasin` package on the same MLP where it is installed.

Writes examples/_out/alignment/alignment.json and docs/img/alignment/alignment.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

import mergelab.align as al
from mergelab.analysis.evaluators import classifier_evaluator
from mergelab.analysis.paths import barrier

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "_out" / "alignment"
IMG = ROOT / "docs" / "img" / "alignment"
console = Console()
# The full run is sized for a shared 2-core machine (see docs/results-alignment.md).
CNN_BASE = 8  # channels at width multiplier 1
CNN_MULTS = {False: [1, 2, 4], True: [1, 2]}  # x8 (64 channels) took too long to train here
LM_STEPS = 600


# ----------------------------------------------------------------------------- data and models


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = seed
        d = make_dataset(args)
        x, y, xt, yt = (torch.tensor(d[k]) for k in ("x", "y", "x_test", "y_test"))
        name = "MNIST-1D (mnist1d, generated locally)"
    except ImportError:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = torch.tensor(d.data) / 16, torch.tensor(d.target)
        x, y, xt, yt = x[:1400], y[:1400], x[1400:], y[1400:]
        name = "scikit-learn digits"
    x, xt = x.float(), xt.float()
    mu, sd = x.mean(), x.std()
    return (x - mu) / sd, y.long(), (xt - mu) / sd, yt.long(), name


class MLP(nn.Module):
    def __init__(self, d_in: int, width: int, classes: int = 10, depth: int = 3):
        super().__init__()
        dims = [d_in] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class CNN(nn.Module):
    """ResNet-style 1-D CNN: stem, residual block, strided stage, residual block, pool, linear."""

    def __init__(self, w: int, classes: int = 10):
        super().__init__()
        c = lambda i, o, s=1: nn.Conv1d(i, o, 3, stride=s, padding=1, bias=False)  # noqa: E731
        self.stem, self.bn0 = c(1, w), nn.BatchNorm1d(w)
        self.c1, self.b1, self.c2, self.b2 = c(w, w), nn.BatchNorm1d(w), c(w, w), nn.BatchNorm1d(w)
        self.down, self.bd = c(w, 2 * w, 2), nn.BatchNorm1d(2 * w)
        self.c3, self.b3, self.c4, self.b4 = c(2 * w, 2 * w), nn.BatchNorm1d(2 * w), c(2 * w, 2 * w), nn.BatchNorm1d(2 * w)
        self.pool = nn.AdaptiveAvgPool1d(5)
        self.fc = nn.Linear(2 * w * 5, classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        x = torch.relu(self.bd(self.down(x)))
        x = torch.relu(x + self.b4(self.c4(torch.relu(self.b3(self.c3(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def train(model: nn.Module, x, y, steps: int, seed: int, lr: float = 1e-3, batch: int = 128) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr * 3, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    return model.eval()


# ----------------------------------------------------------------------------- paths


def path_metrics(a: nn.Module, b: nn.Module, alphas, evaluate, repair_data=None) -> dict[str, list[float]]:
    """Metrics at (1 - alpha) A + alpha B, REPAIRed at each alpha when repair_data is given."""
    out: dict[str, list[float]] = {}
    for alpha in alphas:
        m = al.interpolate_modules(a, b, alpha).eval()
        if repair_data is not None and 0 < alpha < 1:
            m = al.repair(m, a, b, repair_data, alpha=alpha)
        for k, v in evaluate(m).items():
            out.setdefault(k, []).append(v)
    return out


def barriers(alphas, metrics) -> dict[str, float]:
    mid = alphas.index(0.5)
    res = {}
    for k, v in metrics.items():
        hib = k == "accuracy"
        res[f"{k} barrier"] = barrier(alphas, v, higher_is_better=hib)
        chord = (v[0] + v[-1]) / 2
        res[f"{k} midpoint barrier"] = (chord - v[mid]) if hib else (v[mid] - chord)
    return res


def classifier_study(kind: str, make, mults, steps, data, alphas, progress, task) -> list[dict]:
    x, y, xt, yt = data
    evaluate = classifier_evaluator(xt, yt)
    probe = [x[:500]]  # activation matching and REPAIR statistics: 500 training examples
    rows = []
    for m in mults:
        models = []
        for seed in (0, 1):
            torch.manual_seed(100 * m + seed)
            models.append(train(make(m), x, y, steps, seed))
        a, b = models
        spec = al.spec_for(a)
        t0 = time.perf_counter()
        wm, _ = al.align(a, b, "weight_matching", spec=spec)
        t_wm = time.perf_counter() - t0
        am, _ = al.align(a, b, "activation_matching", spec=spec, data=probe)
        for method, bb in (("unaligned", b), ("weight matching", wm), ("activation matching", am)):
            for rep in (False, True):
                metrics = path_metrics(a, bb, alphas, evaluate, probe if rep else None)
                rows.append({"model": kind, "mult": m, "method": method, "repair": rep, "alphas": alphas,
                             **{f"path {k}": v for k, v in metrics.items()}, **barriers(alphas, metrics),
                             "endpoint acc": [metrics["accuracy"][0], metrics["accuracy"][-1]],
                             "wm seconds": t_wm})
                progress.advance(task)
    return rows


# ----------------------------------------------------------------------------- transformers


def stdlib_text(chars: int) -> str:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts, n = [], 0
    for f in files:
        t = f.read_text(encoding="utf-8", errors="ignore")
        parts.append(t)
        n += len(t)
        if n >= chars:
            break
    return "".join(parts)[:chars]


def tiny_llama(seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg)


def transformer_study(steps: int, alphas, progress, task) -> list[dict]:
    text = stdlib_text(400_000)
    ids = torch.tensor([min(ord(c), 127) for c in text])
    seq = 64
    windows = ids[: len(ids) // seq * seq].reshape(-1, seq)
    split = int(0.9 * len(windows))
    train_w, test_w = windows[:split], windows[split:][:256]

    def lm_loss(model):
        with torch.no_grad():
            losses = [model(input_ids=w, labels=w).loss for w in test_w.split(64)]
        return {"loss": float(torch.stack(losses).mean())}

    models = []
    for seed in (0, 1):
        model = tiny_llama(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            batch = train_w[torch.randint(0, len(train_w), (32,), generator=g)]
            opt.zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
        models.append(model.eval())
        progress.advance(task)
    a, b = models
    spec = al.spec_for(a)
    t0 = time.perf_counter()
    wm, _ = al.align(a, b, "weight_matching", spec=spec)
    t_wm = time.perf_counter() - t0
    am, _ = al.align(a, b, "activation_matching", spec=spec, data=[{"input_ids": w} for w in train_w[:256].split(64)])
    rows = []
    for method, bb in (("unaligned", b), ("weight matching", wm), ("activation matching", am)):
        metrics = path_metrics(a, bb, alphas, lm_loss)
        rows.append({"model": "llama-2x64 (rotary, GQA)", "method": method, "alphas": alphas,
                     "path loss": metrics["loss"], **barriers(alphas, metrics), "wm seconds": t_wm,
                     "groups": {g: n for g, n in spec.groups.items()}})
        progress.advance(task)
    return rows


# ----------------------------------------------------------------------------- ZipIt


def zipit_study(data, width: int, steps: int) -> list[dict]:
    x, y, xt, yt = data
    halves = (y < 5, y >= 5)
    models = []
    for seed, mask in enumerate(halves):
        torch.manual_seed(500 + seed)
        models.append(train(MLP(x.shape[1], width), x[mask], y[mask], steps, seed))
    a, b = models
    probe = [x[:500]]
    joint = classifier_evaluator(xt, yt)
    task_a = classifier_evaluator(xt[yt < 5], yt[yt < 5])
    task_b = classifier_evaluator(xt[yt >= 5], yt[yt >= 5])
    wm, _ = al.align(a, b)
    candidates = {
        "model A (classes 0-4)": a, "model B (classes 5-9)": b,
        "average, unaligned": al.interpolate_modules(a, b, 0.5),
        "permute (weight matching) and average": al.interpolate_modules(a, wm, 0.5),
        "permute and average + REPAIR": al.repair(al.interpolate_modules(a, wm, 0.5), a, wm, probe),
        "ZipIt (all layers)": al.zipit(a, b, probe),
        "ZipIt, across models only": al.zipit(a, b, probe, within=False),
        "ZipIt, partial (first 2 of 3 layers)": al.zipit(a, b, probe, layers=2),
        "ensemble (logits averaged)": al.zipit(a, b, probe, layers=0),
    }
    rows = []
    for name, model in candidates.items():
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "joint acc": joint(model)["accuracy"], "acc A": task_a(model)["accuracy"],
                     "acc B": task_b(model)["accuracy"], "params": params})
    return rows


# ----------------------------------------------------------------------------- speed


def speed_study(mlp_pair, fast: bool) -> dict:
    a, b = mlp_pair
    spec = al.spec_for(a)
    al.weight_matching(spec, a.state_dict(), b.state_dict())  # warm-up (imports, allocator)
    t0 = time.perf_counter()
    res = al.weight_matching(spec, a.state_dict(), b.state_dict())
    out = {"mlp 3x512 seconds": time.perf_counter() - t0, "mlp objective": res.objective[-1],
           "mlp sweeps": res.sweeps, "mlp objective at identity": res.objective[0]}
    t0 = time.perf_counter()
    res = al.weight_matching(spec, a.state_dict(), b.state_dict(), tol=0)
    out.update({"mlp tol=0 seconds": time.perf_counter() - t0, "mlp tol=0 objective": res.objective[-1],
                "mlp tol=0 sweeps": res.sweeps})
    try:
        from rebasin import PermutationCoordinateDescent

        rb = copy.deepcopy(b)
        t0 = time.perf_counter()
        pcd = PermutationCoordinateDescent(a, rb, torch.randn(8, a.layers[0].in_features))
        pcd.rebasin()
        out["rebasin seconds"] = time.perf_counter() - t0
        # rb is B permuted by rebasin: its weight-matching objective with identity permutations
        out["rebasin objective"] = al.objective(spec, a.state_dict(), rb.state_dict(), al.identity_perms(spec))
    except Exception as exc:  # not installed, or it cannot trace the model
        out["rebasin"] = f"not run: {type(exc).__name__}: {exc}"
    if not fast:
        import transformers as tf

        cfg = tf.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        torch.manual_seed(0)
        ba, bb = tf.BertForMaskedLM(cfg), tf.BertForMaskedLM(cfg)
        spec_b = al.spec_for(ba)
        t0 = time.perf_counter()
        res = al.weight_matching(spec_b, ba.state_dict(), bb.state_dict())
        out["minilm-sized bert seconds"] = time.perf_counter() - t0
        out["minilm-sized bert params"] = sum(p.numel() for p in ba.parameters())
        out["minilm-sized bert sweeps"] = res.sweeps
        out["minilm-sized bert groups"] = len(spec_b.groups)
    return out


# ----------------------------------------------------------------------------- report


def render(rows, trans, zips, speed) -> None:
    t = Table(title="barriers along the linear path (test set); midpoint barrier = metric(0.5) vs the endpoints' mean")
    for c in ("model", "x", "method", "REPAIR", "loss barrier", "loss mid", "acc barrier", "endpoint acc"):
        t.add_column(c, justify="left" if c in ("model", "method") else "right")
    for r in rows:
        t.add_row(r["model"], str(r["mult"]), r["method"], "yes" if r["repair"] else "no",
                  f"{r['loss barrier']:.3f}", f"{r['loss midpoint barrier']:.3f}", f"{100 * r['accuracy barrier']:.1f}",
                  f"{100 * r['endpoint acc'][0]:.1f} / {100 * r['endpoint acc'][1]:.1f}")
    console.print(t)
    t = Table(title="tiny Llama LMs (character-level, stdlib sources)")
    for c in ("method", "loss barrier", "loss mid", "loss A / B", "loss at 0.5"):
        t.add_column(c)
    for r in trans:
        p = r["path loss"]
        t.add_row(r["method"], f"{r['loss barrier']:.3f}", f"{r['loss midpoint barrier']:.3f}",
                  f"{p[0]:.3f} / {p[-1]:.3f}", f"{p[r['alphas'].index(0.5)]:.3f}")
    console.print(t)
    t = Table(title="ZipIt: models trained on disjoint class halves")
    for c in ("model", "joint acc", "acc 0-4", "acc 5-9", "params"):
        t.add_column(c)
    for r in zips:
        t.add_row(r["model"], f"{100 * r['joint acc']:.1f}", f"{100 * r['acc A']:.1f}", f"{100 * r['acc B']:.1f}",
                  str(r["params"]))
    console.print(t)
    console.print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in speed.items()})


def plot(rows, trans, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    styles = {"unaligned": "tab:red", "weight matching": "tab:blue", "activation matching": "tab:green"}
    for ax, kind, metric, scale, label in ((axes[0], "MLP", "loss barrier", 1, "test-loss barrier"),
                                           (axes[1], "CNN", "accuracy barrier", 100, "accuracy barrier (points)")):
        for method, color in styles.items():
            for rep, ls in ((False, "-"), (True, "--")):
                sel = [r for r in rows if r["model"] == kind and r["method"] == method and r["repair"] == rep]
                if sel:
                    ax.plot([r["mult"] for r in sel], [scale * r[metric] for r in sel], ls, color=color, marker="o",
                            label=f"{method}{' + REPAIR' if rep else ''}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width multiplier")
        ax.set_ylabel(label)
        ax.set_title(f"{kind}: {label} vs width")
    axes[0].legend(fontsize=7)
    widest = max(r["mult"] for r in rows if r["model"] == "MLP")
    for r in rows:
        if r["model"] == "MLP" and r["mult"] == widest:
            axes[2].plot(r["alphas"], r["path loss"], "--" if r["repair"] else "-", color=styles[r["method"]],
                         label=f"{r['method']}{' + REPAIR' if r['repair'] else ''}")
    axes[2].set_title(f"MLP x{widest}: test loss along the path")
    axes[2].set_xlabel("alpha (A -> B)")
    axes[2].legend(fontsize=7)
    for r in trans:
        axes[3].plot(r["alphas"], r["path loss"], color=styles[r["method"]], label=r["method"])
    axes[3].set_title("tiny Llama (rotary, GQA): held-out loss")
    axes[3].set_xlabel("alpha (A -> B)")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="reduced run: widths x1, x2, fewer steps, 5 points")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default docs/img/alignment/alignment.png; "
                        "--fast: under --out)")
    args = parser.parse_args(argv)
    fast = args.fast
    # On a shared 2-core machine two spinning threads per op run 10-25x slower than one,
    # and oneDNN's small-channel conv kernels are slower than the native ones.
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    mults = [1, 2] if fast else [1, 2, 4, 8]
    steps = 300 if fast else 1500
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0] if fast else [i / 10 for i in range(11)]
    x, y, xt, yt, data_name = load_data()
    data = (x, y, xt, yt)
    cnn_data = (x[:, None], y, xt[:, None], yt)
    total = 3 * 2 * (len(mults) + len(CNN_MULTS[fast])) + 5
    t0 = time.perf_counter()

    def done(stage: str) -> None:
        console.log(f"{stage} done, {time.perf_counter() - t0:.0f} s so far")

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("alignment experiments", total=total)
        rows = classifier_study("MLP", lambda m: MLP(x.shape[1], 64 * m), mults, steps, data, alphas, progress, task)
        done("MLP paths")
        rows += classifier_study("CNN", lambda m: CNN(CNN_BASE * m), CNN_MULTS[fast], steps // 2, cnn_data,
                                 [0.0, 0.25, 0.5, 0.75, 1.0], progress, task)
        done("CNN paths")
        trans = transformer_study(150 if fast else LM_STEPS, alphas, progress, task)
        done("transformer paths")
    zips = zipit_study(data, 128, steps)
    done("ZipIt")
    widest = max(mults)
    torch.manual_seed(7)
    speed_pair = (train(MLP(x.shape[1], 512), x, y, 200, 0), train(MLP(x.shape[1], 512), x, y, 200, 1))
    speed = speed_study(speed_pair, fast)
    done("speed")
    result = {"data": data_name, "fast": fast, "mults": mults, "steps": steps, "widest": widest,
              "paths": rows, "transformer": trans, "zipit": zips, "speed": speed,
              "command": "python examples/alignment.py" + (" --fast" if fast else "")}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".alignment.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out / "alignment.json")
    render(rows, trans, zips, speed)
    plot(rows, trans, args.plot or (args.out / "alignment.png" if fast else IMG / "alignment.png"))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
