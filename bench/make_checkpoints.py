"""Write synthetic Llama-shaped Hugging Face checkpoints for the benchmark.

A base model and fine-tunes of it (base + N(0, delta_std^2) noise, one seed per
fine-tune), stored as bf16 sharded safetensors with model.safetensors.index.json
and a LlamaForCausalLM config.json, so mergekit, mergelab and transformers all
accept the folders. No tokenizer is written: mergekit 0.1.5 only tries to copy
one (and carries on without it), and the benchmark runs it with
--no-copy-tokenizer.

Tensors are generated one at a time from generators seeded by (seed, tensor
name), so a model never sits in memory whole and the same arguments always give
the same bytes. Peak memory is about one shard plus one float32 tensor.

    python bench/make_checkpoints.py --out bench/_work/inputs/tinyllama
    python bench/make_checkpoints.py --size tiny --out /tmp/tiny --layers 3
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

INIT_STD = 0.02  # Llama's initializer_range: base weights ~ N(0, 0.02^2)
NAMES = ("base", "ft_a", "ft_b")  # the base, then the fine-tunes


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """The shape of a Llama model (defaults: TinyLlama-1.1B)."""

    layers: int = 22
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads}) "
                             f"and heads a multiple of kv_heads ({self.kv_heads})")


SIZES = {
    "tinyllama": LlamaSpec(),
    "tiny": LlamaSpec(layers=2, hidden=256, intermediate=704, heads=4, kv_heads=2, vocab=1024),
}
# Shards of ~1 GB at full size; several small shards at tiny size so that the
# index and multi-shard reading are exercised as well.
DEFAULT_SHARD = {"tinyllama": "1GB", "tiny": "1MB"}


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '512MB' -> 512 * 10**6, '1GiB' -> 2**30, '123' -> 123 bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r} is not a byte count like 1GB, 512MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * powers[unit])


def llama_shapes(spec: LlamaSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of LlamaForCausalLM (untied lm_head), in file order."""
    h, kv = spec.hidden, spec.kv_heads * (spec.hidden // spec.heads)
    shapes = [("model.embed_tokens.weight", (spec.vocab, h))]
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (spec.intermediate, h)),
            (p + "mlp.up_proj.weight", (spec.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, spec.intermediate)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (spec.vocab, h))]


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = []
    used = max_bytes + 1  # forces a new shard for the first tensor
    for name, nbytes in sizes:
        if used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def make_tensor(name: str, shape: tuple[int, ...], variant: int | None, seed: int = 0,
                delta_std: float = 1e-3) -> torch.Tensor:
    """One bf16 tensor of the base (variant None) or of fine-tune `variant`.

    A fine-tune is bf16(base + N(0, delta_std^2)), computed from the stored bf16
    base, so `ft - base` is the intended small task vector up to bf16 rounding.
    """
    if name.endswith("norm.weight"):
        base = torch.ones(shape, dtype=torch.float32)
    else:
        base = torch.randn(shape, generator=_generator(seed, name)).mul_(INIT_STD)
    base = base.to(torch.bfloat16)
    if variant is None:
        return base
    delta = torch.randn(shape, generator=_generator(seed + 1000 * (variant + 1), name))
    return delta.mul_(delta_std).add_(base.float()).to(torch.bfloat16)


def llama_config(spec: LlamaSpec) -> dict:
    """config.json of a LlamaForCausalLM with this shape, stored in bf16."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "vocab_size": spec.vocab,
        "head_dim": spec.hidden // spec.heads, "hidden_act": "silu",
        "max_position_embeddings": 2048, "initializer_range": INIT_STD, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "pretraining_tp": 1, "use_cache": True,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def write_checkpoint(out: Path, spec: LlamaSpec, variant: int | None, *, seed: int = 0,
                     delta_std: float = 1e-3, shard_bytes: int = 10**9) -> Path:
    """Write one model folder; holds at most one shard's tensors in memory."""
    shapes = dict(llama_shapes(spec))
    shards = plan_shards([(n, 2 * _numel(s)) for n, s in shapes.items()], shard_bytes)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: make_tensor(n, shapes[n], variant, seed, delta_std) for n in names}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        del tensors
    index = {"metadata": {"total_size": sum(2 * _numel(s) for s in shapes.values())},
             "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(llama_config(spec), indent=2))
    (tmp / "bench_spec.json").write_text(json.dumps(_fingerprint(spec, variant, seed, delta_std)))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a folder under `out` is always complete
    return out


def make_family(root: Path, spec: LlamaSpec, *, finetunes: int = 2, seed: int = 0,
                delta_std: float = 1e-3, shard_bytes: int = 10**9,
                log=print) -> dict[str, Path]:
    """Write base, ft_a, ft_b under root, skipping folders already written with these settings."""
    if not 1 <= finetunes <= len(NAMES) - 1:
        raise ValueError(f"finetunes must be between 1 and {len(NAMES) - 1}")
    paths = {}
    for variant, name in zip([None, *range(finetunes)], NAMES):
        path = root / name
        want = _fingerprint(spec, variant, seed, delta_std)
        marker = path / "bench_spec.json"
        if marker.exists() and json.loads(marker.read_text()) == want:
            log(f"reusing {path}")
        else:
            log(f"writing {path}")
            write_checkpoint(path, spec, variant, seed=seed, delta_std=delta_std,
                             shard_bytes=shard_bytes)
        paths[name] = path
    return paths


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fingerprint(spec: LlamaSpec, variant: int | None, seed: int, delta_std: float) -> dict:
    return {"spec": dataclasses.asdict(spec), "variant": variant, "seed": seed,
            "delta_std": delta_std}


def spec_from_args(args: argparse.Namespace) -> LlamaSpec:
    """The preset named by --size with any of --layers/--hidden/... overriding it."""
    overrides = {f: getattr(args, f) for f in ("layers", "hidden", "intermediate", "heads",
                                                "kv_heads", "vocab") if getattr(args, f) is not None}
    return dataclasses.replace(SIZES[args.size], **overrides)


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="tinyllama",
                        help="preset shape: tinyllama (1.1B) or tiny (2 layers, hidden 256)")
    for flag in ("layers", "hidden", "intermediate", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{flag}", type=int, default=None, help=f"override the preset's {flag}")
    parser.add_argument("--shard-size", default=None,
                        help="maximum bytes per shard (default 1GB for tinyllama, 1MB for tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of base and deltas")
    parser.add_argument("--delta-std", type=float, default=1e-3,
                        help="standard deviation of the fine-tunes' deltas")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="folder that receives base/ ft_a/ ft_b/")
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    make_family(args.out, spec, seed=args.seed, delta_std=args.delta_std,
                shard_bytes=parse_size(args.shard_size or DEFAULT_SHARD[args.size]))


if __name__ == "__main__":
    main()
