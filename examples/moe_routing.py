"""Where `mergelab moe` sends tokens, by gate mode, and how much memory building an MoE takes.

Part 1 (routing): three tiny Llama experts (arithmetic, cooking, code; the
builders of tests/moe/moe_kit.py), one MoE per gate mode, and the share of
held-out prompts' tokens of each domain whose top-1 expert (per layer) is each
expert. Writes docs/img/moe/routing.png and prints a Markdown table.

Part 2 (memory): peak resident memory of `mergelab moe` and `mergekit-moe`
building the same MoE from synthetic dense experts (random gates: no forward
pass), each in a fresh process, minus that process's memory after its imports.

    PYTHONPATH=src python examples/moe_routing.py [--fast] [--out docs/img/moe]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "moe"))  # the tiny experts the tests build

from moe_kit import DOMAINS, llama_config, sentences, write_experts, write_tokenizer  # noqa: E402

from mergelab.moe.build import build_moe  # noqa: E402
from mergelab.moe.routing import load_moe, routing_shares  # noqa: E402

MODES = ("hidden", "hidden_avg", "cheap_embed", "random")


def routing(work: Path, n_prompts: int) -> dict:
    family = write_experts(work / "experts")
    groups = {d: sentences(d, n_prompts, seed=500 + i) for i, d in enumerate(DOMAINS)}
    results = {}
    for mode in MODES:
        config = {"base_model": str(family["base"]), "gate_mode": mode, "dtype": "float32",
                  "experts": [{"source_model": str(family[d]), "positive_prompts": sentences(d, 8, seed=100 + i)}
                              for i, d in enumerate(DOMAINS)]}
        path = work / f"{mode}.yml"
        path.write_text(yaml.safe_dump(config))
        build_moe(path, work / mode, seed=0, progress=False)
        model, tok = load_moe(work / mode)
        shares = routing_shares(model, tok, groups, num_experts=len(DOMAINS))
        results[mode] = {k: v.tolist() for k, v in shares.items()}
    return results


def plot_routing(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.2))
    for ax, (mode, shares) in zip(axes, results.items()):
        mean = torch.tensor(shares["tokens"]).mean(dim=0)                  # (G, E) over layers
        ax.imshow(mean, vmin=0, vmax=1, cmap="Blues")
        for g in range(mean.shape[0]):
            for e in range(mean.shape[1]):
                ax.text(e, g, f"{mean[g, e]:.2f}", ha="center", va="center",
                        color="white" if mean[g, e] > 0.5 else "black", fontsize=9)
        ax.set_xticks(range(len(DOMAINS)), [f"expert {d}" for d in DOMAINS], rotation=30, fontsize=8)
        ax.set_yticks(range(len(DOMAINS)), list(DOMAINS), fontsize=8)
        ax.set_title(f"gate_mode: {mode}", fontsize=10)
    fig.suptitle("share of held-out tokens per domain (rows) sent to each expert (top-1, mean over layers)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def routing_table(results: dict) -> str:
    lines = ["| gate_mode | " + " | ".join(f"layer {i}" for i in range(len(results["hidden"]["tokens"])))
             + " | last token, all layers |", "|---|" + "---:|" * (len(results["hidden"]["tokens"]) + 1)]
    for mode, shares in results.items():
        right = torch.diagonal(torch.tensor(shares["tokens"]), dim1=1, dim2=2)  # (L, G)
        last = torch.diagonal(torch.tensor(shares["last"]), dim1=1, dim2=2)
        cells = [f"{r.mean():.3f} (min {r.min():.2f})" for r in right]
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {last.mean():.3f} |")
    return "\n".join(lines)


# -- memory ---------------------------------------------------------------------------------

# VmHWM (peak resident set of this process's memory map, reset by exec) rather than ru_maxrss,
# which Linux carries over from the parent across fork and exec.
_PEAK = """
import json, sys
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
import torch, transformers
{imports}
after_import = hwm()
{run}
print(json.dumps({{"after_import_mb": after_import, "peak_mb": hwm()}}))
"""


def synthetic_family(root: Path, experts: int, hidden: int, inter: int, layers: int) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                          num_attention_heads=8, num_key_value_heads=8))
    paths = {}
    for i in range(experts + 1):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
        paths[f"m{i}"] = root / f"m{i}"
        model.save_pretrained(paths[f"m{i}"])
    write_tokenizer(paths["m0"])  # mergekit-moe loads the base's tokenizer whatever the gate mode
    return paths


def peak_memory(work: Path, experts: int, hidden: int, inter: int, layers: int) -> dict:
    work.mkdir(parents=True)
    fam = synthetic_family(work / "synthetic", experts, hidden, inter, layers)
    config = {"base_model": str(fam["m0"]), "gate_mode": "random", "dtype": "float32",
              "experts": [{"source_model": str(fam[f"m{i}"])} for i in range(1, experts + 1)]}
    cfg = work / "synthetic.yml"
    cfg.write_text(yaml.safe_dump(config))
    runs = {
        "mergelab moe": ("from mergelab.moe.build import build_moe",
                         f"build_moe({str(cfg)!r}, {str(work / 'ml')!r}, seed=0, progress=False)"),
        "mergekit-moe 0.1.5": ("from mergekit.merge import MergeOptions\nfrom mergekit.moe.config import "
                               "MoEMergeConfig\nfrom mergekit.scripts.moe import build\nimport yaml",
                               f"build(MoEMergeConfig.model_validate(yaml.safe_load(open({str(cfg)!r}))), "
                               f"{str(work / 'mk')!r}, MergeOptions(quiet=True, copy_tokenizer=False), device='cpu')"),
    }
    out = {"output_mb": 0.0, "one_expert_layer_mb": 3 * hidden * inter * 4 / 2**20}
    for name, (imports, run) in runs.items():
        code = _PEAK.format(imports=imports, run=run)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["output_mb"] = sum(f.stat().st_size for f in (work / "ml").glob("*.safetensors")) / 2**20
    return out


def memory_table(rows: list[dict]) -> str:
    lines = ["| experts | output (MB) | one expert's MLP, one layer (MB) | mergelab moe: peak - after imports (MB) "
             "| mergekit-moe 0.1.5: peak - after imports (MB) |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        ml, mk = (r[k]["peak_mb"] - r[k]["after_import_mb"] for k in ("mergelab moe", "mergekit-moe 0.1.5"))
        lines.append(f"| {r['experts']} | {r['output_mb']:.0f} | {r['one_expert_layer_mb']:.1f} | {ml:.0f} | {mk:.0f} |")
    return "\n".join(lines)


def plot_memory(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["output_mb"] for r in rows]
    for key, marker in (("mergelab moe", "o"), ("mergekit-moe 0.1.5", "s")):
        ax.plot(x, [r[key]["peak_mb"] - r[key]["after_import_mb"] for r in rows], marker=marker, label=key)
    ax.plot(x, x, ":", color="gray", label="output size")
    ax.set_xlabel("output size (MB)")
    ax.set_ylabel("peak memory above imports (MB)")
    ax.set_title("building an MoE (random gates)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer prompts, smaller synthetic experts")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "moe")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = routing(work, n_prompts=10 if args.fast else 40)
        plot_routing(results, args.out / "routing.png")
        print(routing_table(results))
        size = dict(hidden=128, inter=512, layers=4) if args.fast else dict(hidden=256, inter=1024, layers=8)
        memory = []
        for experts in ((2, 4) if args.fast else (2, 4, 8)):
            memory.append({**peak_memory(work / f"mem{experts}", experts=experts, **size), "experts": experts,
                           **size})
        print(memory_table(memory))
        plot_memory(memory, args.out / "memory.png")
    (args.out / "moe_results.json").write_text(json.dumps({"routing": results, "memory": memory}, indent=2) + "\n")


if __name__ == "__main__":
    main()
