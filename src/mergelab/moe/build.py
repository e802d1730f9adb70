"""`mergelab moe`: a Mixtral or Qwen2-MoE checkpoint from dense models, streamed expert by expert.

The base model gives every tensor outside the MLPs (embeddings, attention,
norms, lm_head) and, for prompted gate modes, the hidden states that make the
routers (gates.py). Each expert gives its MLP matrices, read one expert of one
layer at a time through the checkpoint reader and written straight into their
place in the output (CheckpointWriter), so memory holds one expert's MLP of
one layer, plus the base model while the gates are computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.writer import CheckpointWriter, TensorInfo
from mergelab.device import resolve_device
from mergelab.methods.seeding import make_generator
from mergelab.errors import MergeError, NonFiniteError
from mergelab.methods.kernels import has_nonfinite
from mergelab.moe import gates as G
from mergelab.moe.arch import expert_names, output_config, router_names
from mergelab.moe.config import MoEPlan, load_moe_config
from mergelab.progress import ByteProgress

__all__ = ["build_moe", "compute_gates", "MoEResult"]

_MLP = re.compile(r"^model\.layers\.\d+\.mlp\.")
_PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class MoEResult:
    out_dir: Path
    output: str                       # "Mixtral" | "Qwen MoE"
    num_experts: int
    tensors: int
    degenerate_layers: list[int]      # layers whose gates are nearly parallel (mergekit's warning)
    dropped: list[str]                # base tensors not in the output (its dense MLPs)
    seconds: float

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def compute_gates(plan: MoEPlan, *, device: str = "cpu", gate_dtype: torch.dtype = torch.float32,
                  seed: int | None = None, batch_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """(L, E, H) router weights of the routed experts and (L, S, H) of the shared ones (or None), float32."""
    mode, entries = plan.config.gate_mode, plan.all_experts
    layers, hidden = plan.num_layers, plan.hidden_size
    if mode in ("random", "uniform_random"):
        gates = G.random_gates(layers, len(entries), hidden, mode, make_generator(seed, "moe.gates", torch.device("cpu")))
    else:
        tokenizer = _tokenizer(plan.base)
        vectors = _hidden_vectors(plan, tokenizer, device, gate_dtype, batch_size) if mode != "cheap_embed" \
            else _cheap_vectors(plan, tokenizer)
        rows = []
        for e in entries:
            rows.append(G.gate_from_vectors(vectors(e.positive_prompts),
                                            vectors(e.negative_prompts) if e.negative_prompts else None))
        gates = torch.stack(rows, dim=1)                                   # (L, E + S, H)
    n = len(plan.config.experts)
    return gates[:, :n].contiguous(), (gates[:, n:].contiguous() if plan.shared else None)


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "no usable tokenizer"
        raise MergeError(f"base_model: cannot load the tokenizer of {base} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); prompted gate modes need the "
                         "base's tokenizer files (or use gate_mode: random)") from None
    # As mergekit-moe: left padding (so the last position is each prompt's last token), padded with BOS.
    tok.padding_side = "left"
    if tok.bos_token is not None:
        tok.pad_token = tok.bos_token
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _hidden_vectors(plan: MoEPlan, tokenizer, device: str, dtype: torch.dtype,
                    batch_size: int) -> Callable[[list[str]], Tensor]:
    import transformers
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    key = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(plan.base), local_files_only=True, **{key: dtype})
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "this folder does not load"
        raise MergeError(f"base_model: transformers cannot load {plan.base} to compute the gates "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                         "check its config and weights") from None
    model = model.to(dev).eval()
    reduce = "mean" if plan.config.gate_mode == "hidden_avg" else "last"

    def vectors(prompts: list[str]) -> Tensor:
        total = None
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            batch = G.tokenize_prompts(tokenizer, chunk)
            states = G.layer_inputs(model, batch)                          # (L, B, T, H) on dev
            v = G.prompt_vectors(states, batch["attention_mask"].to(dev), reduce) * len(chunk)
            total = v if total is None else total + v
        return (total / len(prompts)).cpu()                                # (L, H)

    return vectors  # the model lives as long as this closure


def _cheap_vectors(plan: MoEPlan, tokenizer) -> Callable[[list[str]], Tensor]:
    with Checkpoint(plan.base) as ck:
        embed = ck["model.embed_tokens.weight"]

    def vectors(prompts: list[str]) -> Tensor:
        batch = G.tokenize_prompts(tokenizer, prompts)
        return G.cheap_embedding(embed, batch["input_ids"], batch["attention_mask"], plan.num_layers)

    return vectors


def _layout(plan: MoEPlan, base: Checkpoint, dtype: torch.dtype, fused: bool) -> tuple[list[TensorInfo], list[str]]:
    """Every output tensor (name, shape, dtype), and the base tensors left out (its dense MLPs)."""
    H, I, E = plan.hidden_size, plan.intermediate_size, len(plan.config.experts)
    kept = [n for n in base if not _MLP.match(n)]
    dropped = [n for n in base if _MLP.match(n)]
    layout = [TensorInfo(n, base.shape(n), dtype) for n in kept]
    if plan.output == "Qwen MoE":
        layout += [TensorInfo(n, shape, dtype) for n, shape in _missing_biases(base, plan.num_layers)]
    shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I), "gate_up": (E, 2 * I, H),
              "down": (E, H, I)}
    for layer in range(plan.num_layers):
        router, shared_gate = router_names(plan.output, layer, fused)
        layout.append(TensorInfo(router, (E, H), dtype))
        if shared_gate:
            layout.append(TensorInfo(shared_gate, (1, H), dtype))
        names = [expert_names(plan.output, layer, e, fused) for e in range(1 if fused else E)]
        names += [expert_names(plan.output, layer, None, fused)] if plan.shared else []
        layout += [TensorInfo(n, shapes[k], dtype) for group in names for k, n in group.items()]
    return layout, dropped


def _missing_biases(base: Checkpoint, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen2-MoE's q/k/v biases that a Llama/Mistral base lacks: zeros, an exact no-op (as mergekit)."""
    out = []
    for layer in range(layers):
        for p in ("q_proj", "k_proj", "v_proj"):
            prefix = f"model.layers.{layer}.self_attn.{p}"
            if f"{prefix}.bias" not in base:
                out.append((f"{prefix}.bias", (base.shape(f"{prefix}.weight")[0],)))
    return out


def _finite(t: Tensor, what: str) -> Tensor:
    """`t`, or NonFiniteError naming `what`: an MoE built from NaN/Inf weights would be silently broken."""
    if has_nonfinite(t):
        raise NonFiniteError(f"{what} holds NaN or Inf values; nothing was written. Repair or leave out that "
                             "model (or, for noise_scale / residual_scale, use smaller numbers or a wider dtype)")
    return t


def _read(ck: Checkpoint, name: str, dtype: torch.dtype) -> Tensor:
    return _finite(ck[name], f"tensor {name} of {ck.path}").to(dtype)


def _expert_matrices(ck: Checkpoint, layer: int, entry, seed: int | None, tag: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """One expert's three MLP matrices of one layer, with its noise_scale / residual_scale, in `dtype`."""
    out = {}
    for proj in _PROJS:
        name = f"model.layers.{layer}.mlp.{proj}.weight"
        t = _finite(ck[name], f"tensor {name} of {ck.path}")
        if entry.noise_scale or (entry.residual_scale is not None and proj == "down_proj"):
            t = t.float()
            if entry.noise_scale:
                gen = make_generator(seed, f"{tag}.layers.{layer}.{proj}", torch.device("cpu"))
                t = t + torch.randn(t.shape, generator=gen) * entry.noise_scale
            if entry.residual_scale is not None and proj == "down_proj":
                t = t * entry.residual_scale
        out[proj] = _finite(t.to(dtype), f"expert {tag}'s {name} after noise_scale / residual_scale")
    return out


def build_moe(config_path: str | Path, out_dir: str | Path, *, device: str = "cpu", seed: int | None = None,
              gate_dtype: torch.dtype = torch.float32, fused: bool = False, shard_size: int = 5 * 10**9,
              overwrite: bool = False, copy_tokenizer: bool = True, write_model_card: bool = True,
              allow_all_same: bool = False, progress: bool = True) -> MoEResult:
    """Read a mergekit-moe config and write its MoE to `out_dir`. See the module docstring.

    Args:
        device: where the base model runs to compute hidden-state gates (cpu, cuda, cuda:N).
        seed: seeds random gates and experts' noise_scale (from (seed, tensor name)).
        gate_dtype: dtype of the base model's forward pass (mergekit-moe uses bfloat16).
        fused: write transformers 5's fused expert tensors instead of one tensor per expert.
    """
    start = time.perf_counter()
    try:
        import transformers  # noqa: F401  (config classes, tokenizer and the base model for the gates)
    except ImportError:
        raise MergeError("mergelab moe needs transformers: pip install 'mergelab[hf]'") from None
    plan = load_moe_config(config_path, allow_all_same=allow_all_same)
    resolve_device(device)
    inputs = [plan.base, *plan.experts, *plan.shared, Path(config_path)]
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(Checkpoint(plan.base))
        # Opened once (headers and file handles only); tensors are read one expert and layer at a time.
        experts = {p: stack.enter_context(Checkpoint(p)) for p in dict.fromkeys([*plan.experts, *plan.shared])}
        dtype = plan.dtype or base.dtype("model.embed_tokens.weight")
        layout, dropped = _layout(plan, base, dtype, fused)
        writer = stack.enter_context(CheckpointWriter(out_dir, layout, shard_size=shard_size, overwrite=overwrite,
                                                      protected=inputs))
        routed, shared = compute_gates(plan, device=device, gate_dtype=gate_dtype, seed=seed)
        gc.collect()  # the base model that made the gates
        _finite(routed if shared is None else torch.cat([routed, shared], 1),
                f"the gates computed from {plan.base}'s hidden states")
        degenerate = G.degenerate_layers(torch.cat([routed, shared], 1) if shared is not None else routed)
        steps = sum(1 for i in layout if i.name in base or i.name.endswith("_proj.bias"))
        steps += plan.num_layers * (1 + len(plan.experts) + len(plan.shared))
        with ByteProgress(steps, sum(i.nbytes for i in layout), enabled=progress, label="moe") as bar:
            for info in layout:  # everything outside the MLPs, from the base
                if info.name in base:
                    writer.write(info.name, _read(base, info.name, dtype))
                elif info.name.endswith("_proj.bias"):
                    writer.write(info.name, torch.zeros(info.shape, dtype=dtype))
                else:
                    continue
                bar.advance(info.nbytes)
            for layer in range(plan.num_layers):
                router, shared_gate = router_names(plan.output, layer, fused)
                writer.write(router, routed[layer].to(dtype))
                if shared_gate:
                    writer.write(shared_gate, shared[layer].to(dtype))
                bar.advance((routed[layer].numel() + (shared[layer].numel() if shared_gate else 0)) * dtype.itemsize)
                _write_experts(writer, plan, experts, layer, fused, seed, dtype, bar)
        config = output_config(plan.base_config, plan.output, len(plan.config.experts),
                               plan.config.experts_per_token, dtype)
        extra = {"config.json": json.dumps(config, indent=2) + "\n", "mergekit_moe_config.yml": plan.text}
        if write_model_card:
            extra["README.md"] = _model_card(plan)
        result = MoEResult(Path(out_dir), plan.output, len(plan.config.experts), len(layout), degenerate, dropped,
                           time.perf_counter() - start)
        extra["mergelab_report.json"] = json.dumps(result.summary(), indent=2) + "\n"
        result.out_dir = writer.finish(assets_from=plan.base, extra_files=extra, copy_tokenizer=copy_tokenizer)
    return result


def _write_experts(writer: CheckpointWriter, plan: MoEPlan, checkpoints: dict[Path, Checkpoint], layer: int,
                   fused: bool, seed: int | None, dtype: torch.dtype, bar: ByteProgress) -> None:
    entries = [(i, e, p) for i, (e, p) in enumerate(zip(plan.config.experts, plan.experts))]
    entries += [(None, e, p) for e, p in zip(plan.config.shared_experts or [], plan.shared)]
    for index, entry, path in entries:
        tag = f"experts.{index}" if index is not None else "shared_expert"
        mats = _expert_matrices(checkpoints[path], layer, entry, seed, tag, dtype)
        names = expert_names(plan.output, layer, index, fused and index is not None)
        if "gate_up" in names:
            writer.write_rows(names["gate_up"], index, torch.cat([mats["gate_proj"], mats["up_proj"]])[None])
            writer.write_rows(names["down"], index, mats["down_proj"][None])
        else:
            for proj, name in names.items():
                writer.write(name, mats[proj])
        bar.advance(sum(m.numel() * m.element_size() for m in mats.values()))


def _model_card(plan: MoEPlan) -> str:
    lines = [f"# Mixture of experts ({plan.output})", "",
             f"Made with `mergelab moe` from the dense base `{plan.config.base_model}` and "
             f"{len(plan.config.experts)} experts; gate mode `{plan.config.gate_mode}`, "
             f"{plan.config.experts_per_token} experts per token.", "", "| expert | model |", "|---|---|"]
    lines += [f"| {i} | `{e.source_model}` |" for i, e in enumerate(plan.config.experts)]
    lines += [f"| shared | `{e.source_model}` |" for e in plan.config.shared_experts or []]
    lines += ["", "The config is in `mergekit_moe_config.yml`.", ""]
    return "\n".join(lines)
