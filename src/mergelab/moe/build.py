"""`mergelab moe`: a Mixtral or Qwen2-MoE checkpoint from dense models, streamed expert by expert.

The base model gives every tensor outside the MLPs (embeddings, attention,
norms, lm_head) and, for prompted gate modes, the hidden states that make the
routers (gates.py). Each expert gives its MLP matrices, read one expert of one
layer at a time through the checkpoint reader and written straight into their
place in the output: expert jobs (moe/jobs.py) that engine.run streams into a
FolderSink, so memory holds one expert's MLP of one layer (fused: the layer's
routed experts), plus the base model while the gates are computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mergelab.checkpoint.output import check_output
from mergelab.checkpoint.reader import Checkpoint
from mergelab.device import resolve_device
from mergelab.engine import FolderSink, run
from mergelab.errors import MergeError
from mergelab.methods.seeding import make_generator
from mergelab.moe import gates as G
from mergelab.moe.arch import output_config
from mergelab.moe.config import MoEPlan, load_moe_config
from mergelab.moe.jobs import finite, moe_jobs, refuse_nonfinite

__all__ = ["build_moe", "compute_gates", "MoEResult"]


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


def _checked_gates(plan: MoEPlan, device: str, gate_dtype: torch.dtype, seed: int | None
                   ) -> tuple[Tensor, Tensor | None, list[int]]:
    """compute_gates' routers, refused if NaN/Inf, and the layers whose gates are nearly parallel."""
    routed, shared = compute_gates(plan, device=device, gate_dtype=gate_dtype, seed=seed)
    gc.collect()  # the base model that made the gates
    both = routed if shared is None else torch.cat([routed, shared], 1)
    finite(both, f"the gates computed from {plan.base}'s hidden states")
    return routed, shared, G.degenerate_layers(both)


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
    check_output(out_dir, kind="folder", inputs=inputs, overwrite=overwrite, what="output folder")  # before the gates
    with contextlib.ExitStack() as stack:
        # Opened once (headers and file handles only); the engine reads one expert and layer at a time.
        ckpts = [stack.enter_context(Checkpoint(p)) for p in dict.fromkeys([plan.base, *plan.experts, *plan.shared])]
        dtype = plan.dtype or ckpts[0].dtype("model.embed_tokens.weight")
        routed, shared, degenerate = _checked_gates(plan, device, gate_dtype, seed)
        jobs, dropped = moe_jobs(plan, ckpts, dtype, fused, routed, shared, seed)
        result = MoEResult(Path(out_dir), plan.output, len(plan.config.experts), len(jobs.layout), degenerate,
                           dropped, 0.0)

        def extra_files(report) -> dict[str, str]:
            result.seconds = time.perf_counter() - start
            return _output_files(plan, dtype, result, write_model_card)

        sink = FolderSink(out_dir, shard_size=shard_size, overwrite=overwrite, protected=inputs,
                          extra_files_fn=extra_files, copy_tokenizer=copy_tokenizer)
        run(jobs, sink, refuse_nonfinite(jobs), show_progress=progress)
    result.out_dir = sink.writer.out_dir
    return result


def _output_files(plan: MoEPlan, dtype: torch.dtype, result: MoEResult, write_model_card: bool) -> dict[str, str]:
    """The MoE's config.json (replacing the base's), its mergekit-moe config, model card and report."""
    config = output_config(plan.base_config, plan.output, len(plan.config.experts), plan.config.experts_per_token,
                           dtype)
    extra = {"config.json": json.dumps(config, indent=2) + "\n", "mergekit_moe_config.yml": plan.text}
    if write_model_card:
        extra["README.md"] = _model_card(plan)
    extra["mergelab_report.json"] = json.dumps(result.summary(), indent=2) + "\n"
    return extra


def _model_card(plan: MoEPlan) -> str:
    lines = [f"# Mixture of experts ({plan.output})", "",
             f"Made with `mergelab moe` from the dense base `{plan.config.base_model}` and "
             f"{len(plan.config.experts)} experts; gate mode `{plan.config.gate_mode}`, "
             f"{plan.config.experts_per_token} experts per token.", "", "| expert | model |", "|---|---|"]
    lines += [f"| {i} | `{e.source_model}` |" for i, e in enumerate(plan.config.experts)]
    lines += [f"| shared | `{e.source_model}` |" for e in plan.config.shared_experts or []]
    lines += ["", "The config is in `mergekit_moe_config.yml`.", ""]
    return "\n".join(lines)
