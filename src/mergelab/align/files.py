"""Align checkpoints on disk: read A and B, find B's permutations, write aligned B as a model folder.

Hugging Face folders (config.json of a supported type) get their spec from the config;
other checkpoints (a state-dict file or folder) from a torch.fx trace of the module a
`module:factory` builds. The output streams through the engine (permute jobs into a
FolderSink: a temporary folder renamed into place), with B's config and tokenizer and an `alignment.json`
holding the permutations, so `mergelab merge` and `mergelab analyze path` read it
like any model folder.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab.align.align import _ALIASES, METHODS, check_pair
from mergelab.align.hf import spec_for_hf
from mergelab.align.matching import MatchResult, activation_matching, weight_matching
from mergelab.align.spec import PermutationSpec, permute_tensor, permuted_axes
from mergelab.align.trace import spec_from_module
from mergelab.analysis.eval_setup import factory_module, inputs_and_labels, load_torch_file, token_ids, read_state
from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.writer import parse_size
from mergelab.engine import FolderSink, run
from mergelab.errors import MergeError, fixed_by
from mergelab.plan import Job, OutputSpec, Plan, TensorRef


def _config(path: Path) -> dict[str, Any] | None:
    cfg = path / "config.json" if path.is_dir() else None
    return json.loads(cfg.read_text()) if cfg is not None and cfg.is_file() else None


def _hf_module(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The transformers model class named in config.json, built from it and loaded with `state`."""
    try:
        import transformers

        cls = getattr(transformers, (config.get("architectures") or ["AutoModel"])[0])
        model = cls(transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True))
    except Exception as exc:
        raise MergeError(f"{folder}: cannot build the model of its config.json for activation matching "
                         f"({type(exc).__name__}: {exc})") from exc
    want = model.state_dict()
    full = {k: state[k] if k in state else want[k] for k in want}
    missing = [k for k in want if k not in state and not k.endswith(("inv_freq", "position_ids", "attn.bias",
                                                                     "masked_bias"))]
    if missing:
        raise MergeError(f"{folder} lacks tensors {missing[:3]} that its model class needs")
    model.load_state_dict(full, strict=True)
    return model.eval()


def _text_batches(data: Path, tokenizer_from: Path, seq_len: int = 128, batch_size: int = 4,
                  max_batches: int = 16) -> list[dict[str, torch.Tensor]]:
    if data.suffix in (".pt", ".safetensors"):
        with fixed_by("data"):
            ids = token_ids(data, "data")
    else:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tokenizer_from), local_files_only=True)
        except Exception as exc:
            raise MergeError(f"data {data}: cannot load the tokenizer of {tokenizer_from} to tokenize it "
                             f"({type(exc).__name__}); give token ids as a .pt file instead", option="data") from exc
        ids = torch.tensor(tok(data.read_text(encoding="utf-8"))["input_ids"])
    windows = ids[: (ids.numel() // seq_len) * seq_len].reshape(-1, seq_len)[: batch_size * max_batches]
    if not len(windows):
        raise MergeError(f"data {data} holds fewer than {seq_len} tokens", option="data")
    return [{"input_ids": w} for w in windows.split(batch_size)]


def _classifier_batches(data: Path) -> list[torch.Tensor]:
    with fixed_by("data"):
        x, _ = inputs_and_labels(load_torch_file(data, "data"), data, "data")
    return list(x.split(256))


def align_checkpoints(model_a: str | Path, model_b: str | Path, out_dir: str | Path, *,
                      method: str = "weight_matching", data: str | Path | None = None,
                      model_factory: str | None = None, overwrite: bool = False, seed: int = 0,
                      shard_size: str | int = "5GB") -> dict[str, Any]:
    """Write checkpoint B, permuted into A's basis, to out_dir; returns a summary (method, groups,
    objective before/after for weight matching, seconds).

    Finding the permutations reads both models whole; writing aligned B streams it tensor by
    tensor through the engine (permute jobs into a FolderSink).
    """
    method = _ALIASES.get(method, method)
    if method not in METHODS:
        raise MergeError(f"unknown alignment method {method!r}; choose weight or activation")
    a_path, b_path = Path(model_a), Path(model_b)
    with Checkpoint(a_path) as ck_a, Checkpoint(b_path) as ck_b:
        spec, result, seconds = _find_permutations(ck_a, ck_b, method, data, model_factory, seed)
        summary = {"method": method, "reference": str(a_path), "model": str(b_path), "seconds": seconds,
                   "groups": len(spec.groups), "moved": sum(int((p != torch.arange(len(p))).any()) for p in
                                                           result.perms.values()),
                   "objective": result.objective[:1] + result.objective[-1:] if result.objective else []}
        perms = {g: p.tolist() for g, p in result.perms.items()}
        extra = {"alignment.json": json.dumps({**summary, "perms": perms})}
        sink = FolderSink(out_dir, shard_size=parse_size(shard_size), overwrite=overwrite,
                          protected=[a_path, b_path], extra_files_fn=lambda report: extra)
        # Inputs holding NaN/Inf are aligned as they are (listed in the engine's report, not refused).
        run(aligned_plan(ck_b, spec, result.perms), sink, allow_nonfinite=True)
    return summary


def _find_permutations(ck_a: Checkpoint, ck_b: Checkpoint, method: str, data: str | Path | None,
                       model_factory: str | None, seed: int) -> tuple[PermutationSpec, MatchResult, float]:
    """(spec, B's permutations into A's basis, seconds the matching took); both models are read whole."""
    config = _config(ck_a.path)
    state_a, state_b = read_state(ck_a), read_state(ck_b)
    module_a = None
    if model_factory is not None:
        module_a = factory_module(model_factory, None)
        spec: PermutationSpec = spec_from_module(module_a)
    elif config is not None:
        spec = spec_for_hf(config, {k: tuple(v.shape) for k, v in state_a.items()})
    else:
        raise MergeError(f"{ck_a.path} has no config.json of a Hugging Face model; give model_factory= "
                         "(module:factory) building the network so its permutation spec can be traced",
                         option="model_factory")
    check_pair(spec, state_a, state_b)
    start = time.perf_counter()
    if method == "weight_matching":
        result = weight_matching(spec, state_a, state_b, seed=seed)
    else:
        result = _activation_match(spec, ck_a.path, ck_b.path, state_a, state_b, module_a, model_factory, config,
                                   data)
    return spec, result, time.perf_counter() - start


def _activation_match(spec: PermutationSpec, a_path: Path, b_path: Path, state_a, state_b, module_a,
                      model_factory: str | None, config, data: str | Path | None) -> MatchResult:
    if data is None:
        raise MergeError("method='activation' needs data= (a text file or token ids for a Hugging Face "
                         "model, a torch file of inputs for model_factory=)", option="data")
    data = Path(data)
    if module_a is not None:
        module_b = factory_module(model_factory, None)
        module_a.load_state_dict(state_a)
        module_b.load_state_dict(state_b)
        batches = _classifier_batches(data)
    else:
        module_a, module_b = _hf_module(a_path, config, state_a), _hf_module(b_path, config, state_b)
        batches = _text_batches(data, a_path)
    return activation_matching(spec, module_a, module_b, batches)


def aligned_plan(ck: Checkpoint, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> Plan:
    """A plan writing checkpoint `ck` with `perms` applied: a permute job per tensor with a permuted
    axis, a copy job per other tensor, in `ck`'s order; its folder's config and tokenizer go along."""
    jobs = []
    for name in ck:
        ref, shape, dtype = TensorRef(0, name), tuple(ck.shape(name)), ck.dtype(name)
        if permuted_axes(spec, name, perms):
            jobs.append(Job(name=name, shape=shape, dtype=dtype, inputs=(ref,), op="permute",
                            fn=functools.partial(_permute, spec, name, perms)))
        else:
            jobs.append(Job(name=name, shape=shape, dtype=dtype, inputs=(ref,), op="copy"))
    return Plan(None, [ck], jobs, output=OutputSpec(assets_from=ck if ck.folder is not None else None))


def _permute(spec: PermutationSpec, name: str, perms: Mapping[str, torch.Tensor], tensors: list[torch.Tensor],
             device: torch.device) -> torch.Tensor:
    """A permute job's fn: tensor `name` with the permutations applied (as apply_permutations does)."""
    return permute_tensor(spec, name, tensors[0], {g: p.to(device) for g, p in perms.items()})
