"""RegMean++ statistics: Gram matrices taken with the merged earlier blocks, merging block by block.

The model's repeated blocks (the longest nn.ModuleList: ``encoder.layer``,
``model.layers``, ``transformer.h``, ...) are merged in forward order. Task i's
batches first run through the merged model up to block 0 (everything outside
the blocks is the weighted average); the inputs block 0 receives are kept.
Then for each block l: model i's own block l runs on task i's kept inputs and
its linear layers' Grams are accumulated (`gram_matrices`, padding left out);
block l of every model is merged with the registered `regmean_plusplus`
method from those Grams; the merged block l turns the kept inputs into block
l+1's inputs. Cost: one pass over the data per model up to block 0, then
two block calls per block and model.

The Grams are returned per model, keyed like the model's weights, so that
``save_stats`` writes them and a recipe ``method: regmean_plusplus`` with
them merges the same tensors through the engine.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mergelab.errors import StatsError
from mergelab.stats.gram import Batch, gram_matrices, split_batch
from mergelab.stats.io import StatsDict


class _Stop(Exception):
    """Raised by the hook on block 0 once its inputs are kept: nothing after it needs to run."""


@dataclass
class PlusPlusResult:
    """The merged state dict and each model's RegMean++ Grams (StatsDict kind "gram")."""

    state_dict: dict[str, torch.Tensor]
    stats: list[StatsDict] = field(default_factory=list)


def _block_lists(model: nn.Module) -> dict[str, nn.Module]:
    """Candidate block lists by module name: the non-empty nn.ModuleLists, or, in a model without any
    (a plain MLP), its non-empty nn.Sequentials, whose children then run one after the other."""
    lists = {n: m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)}
    return lists or {n: m for n, m in model.named_modules() if isinstance(m, nn.Sequential) and len(m)}


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.Module]:
    """(name, modules) of the model's repeated blocks: ``blocks`` if given, else its longest nn.ModuleList
    (or, without one, its longest nn.Sequential; "" names the model itself)."""
    lists = _block_lists(model)
    if blocks is not None:
        if blocks not in lists:
            raise StatsError(f"{type(model).__name__} has no non-empty nn.ModuleList {blocks!r}; "
                             f"its lists are {sorted(lists)}")
        return blocks, lists[blocks]
    if not lists:
        raise StatsError(f"{type(model).__name__} has no nn.ModuleList (or nn.Sequential) of blocks to merge "
                         "in order; RegMean++ needs repeated blocks (layers)")
    name = max(lists, key=lambda n: (len(lists[n]), -n.count(".")))
    return name, lists[name]


def _block_inputs(model: nn.Module, block: nn.Module, batches: Iterable[Batch]) -> list[dict]:
    """Run each batch until ``block`` and keep what it is called with: one item per batch."""
    items: list[dict] = []

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        if not args and "hidden_states" not in kwargs:
            raise StatsError(f"{type(block).__name__} is called without positional inputs or hidden_states=; "
                             "RegMean++ cannot tell which input carries the features")
        hidden = args[0] if args else kwargs.pop("hidden_states")
        items[-1].update(hidden_states=hidden, call=(tuple(args[1:]), kwargs, bool(args)))
        raise _Stop

    handle, was_training = block.register_forward_pre_hook(hook, with_kwargs=True), model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                args, kwargs, _ = split_batch(batch)
                if getattr(getattr(model, "config", None), "use_cache", False):
                    kwargs["use_cache"] = False  # a cache would grow each time a block is called again
                mask = kwargs.get("attention_mask")
                items.append({"attention_mask": mask} if isinstance(mask, torch.Tensor) and mask.dim() == 2 else {})
                try:
                    model(*args, **kwargs)
                except _Stop:
                    continue
                raise StatsError(f"block {type(block).__name__} never ran in {type(model).__name__}'s forward")
    finally:
        handle.remove()
        model.train(was_training)
    return items


def call_block(block: nn.Module, item: dict) -> torch.Tensor:
    """Block output (its hidden states) on a kept input item."""
    rest, kwargs, positional = item["call"]
    h = item["hidden_states"]
    out = block(h, *rest, **kwargs) if positional else block(*rest, hidden_states=h, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _advance(block: nn.Module, items: list[dict]) -> list[dict]:
    """Items with their hidden states replaced by ``block``'s outputs (the next block's inputs)."""
    block.eval()
    with torch.no_grad():
        return [{**it, "hidden_states": call_block(block, it)} for it in items]


def _model_stats(i: int, grams: list[tuple[str, StatsDict]], n: int, info: dict[str, Any]) -> StatsDict:
    """One model's Grams of every block, keyed like its weights, with what they were computed for."""
    tensors, rows, transposed = {}, {}, []
    for prefix, g in grams:
        tensors.update({prefix + k: v for k, v in g.items()})
        rows.update({prefix + k: r for k, r in g.extra["rows"].items()})
        transposed += [prefix + k for k in g.extra["transposed"]]
    count = grams[0][1].count if grams else 0
    return StatsDict(tensors, kind="gram", count=count,
                     extra={"rows": rows, "transposed": transposed, "model_index": i, "models": n, **info})


def _merge_block(block: nn.Module, own: list[nn.Module], items: list[list[dict]], params: dict) -> list[StatsDict]:
    """Merge the models' copies ``own`` of one block into ``block`` from the Grams of their kept inputs;
    returns those Grams (one StatsDict per model)."""
    from mergelab.methods.calls import merge_state_dicts

    g = [gram_matrices(b, it, forward=call_block) for b, it in zip(own, items)]
    params.setdefault("transposed", bool(g[0].extra["transposed"]))  # transformers' Conv1D (GPT-2)
    block.load_state_dict(merge_state_dicts("regmean_plusplus", own, stats=g, **params))
    return g


def regmean_plusplus_stats(models: Sequence[nn.Module], data: Sequence[Iterable[Batch]], *,
                           weights: Sequence[float] | None = None, blocks: str | None = None,
                           merged_upstream: bool = True, **params: Any) -> PlusPlusResult:
    """Merge ``models`` with RegMean++ block by block; return the merged state dict and each model's Grams.

    Args:
        models: the fine-tuned models (same architecture); they are not modified.
        data: one iterable of batches per model (its task's data), as `split_batch` reads them;
            each is read once, then kept as the inputs of the blocks.
        weights: l_i per model (1 each by default): the recipe's per-model `weight`.
        blocks: name of the nn.ModuleList of blocks (default: the model's longest one).
        merged_upstream: False feeds each model's own earlier blocks instead of the merged ones,
            which gives plain RegMean's Grams (for comparison).
        **params: the shared parameters of `regmean_plusplus` (alpha, transposed, ridge).

    Returns:
        PlusPlusResult: ``state_dict`` (every tensor of models[0], merged) and ``stats[i]``,
        model i's Grams (weight name -> (in, in)), ready for `save_stats`.
    """
    from mergelab.methods.calls import merge_state_dicts

    if len(data) != len(models) or not models:
        raise StatsError(f"RegMean++ needs one dataset per model: got {len(models)} models, {len(data)} datasets")
    params = {"weight": list(weights) if weights is not None else [1.0] * len(models), **params}
    name, _ = find_blocks(models[0], blocks)
    own_lists = [find_blocks(m, name)[1] for m in models]
    if len({len(b) for b in own_lists}) != 1:
        raise StatsError(f"the models have different numbers of blocks in {name!r}: {[len(b) for b in own_lists]}")
    prefix = f"{name}." if name else ""  # "": the model is one nn.Sequential of blocks
    sds = [m.state_dict() for m in models]
    outside = [{k: v for k, v in sd.items() if not k.startswith(prefix)} for sd in sds]
    state = merge_state_dicts("regmean_plusplus", outside, **params) if outside[0] else {}
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(state, strict=False)
    merged_blocks = find_blocks(merged, name)[1]
    sources = [merged] * len(models) if merged_upstream else list(models)
    items = [_block_inputs(src, find_blocks(src, name)[1][0], list(d)) for src, d in zip(sources, data)]
    grams: list[list[tuple[str, StatsDict]]] = [[] for _ in models]
    for layer, block in enumerate(merged_blocks):
        own = [b[layer] for b in own_lists]
        if next(block.parameters(), None) is not None:  # an activation between an MLP's layers has none
            g = _merge_block(block, own, items, params)
            state.update({f"{prefix}{layer}.{k}": v for k, v in block.state_dict().items()})
            for i, gi in enumerate(g):
                grams[i].append((f"{prefix}{layer}.", gi))
        if layer + 1 < len(merged_blocks):
            items = [_advance(block if merged_upstream else own[i], it) for i, it in enumerate(items)]
    info = {"method": "regmean_plusplus", "blocks": name, "merged_upstream": merged_upstream,
            "params": {k: v for k, v in params.items()}}
    stats = [_model_stats(i, gi, len(models), info) for i, gi in enumerate(grams)]
    return PlusPlusResult({k: state[k] for k in sds[0]}, stats)


def gram_plusplus_for(model_dirs: Sequence[Any], datas: Sequence[Any], *, weights: Sequence[float] | None = None,
                      max_examples: int = 256, seq_len: int = 128, batch_size: int = 8,
                      **params: Any) -> PlusPlusResult:
    """`regmean_plusplus_stats` on Hugging Face model folders, each with its text or JSONL file (hf_text)."""
    from mergelab.stats.hf_text import batches, load_model, read_texts

    if len(model_dirs) != len(datas):
        raise StatsError(f"RegMean++ needs one data file per model: got {len(model_dirs)} models, "
                         f"{len(datas)} data files")
    models, data = [], []
    for folder, path in zip(model_dirs, datas):
        model, tok, _ = load_model(folder)
        texts = read_texts(path, max_examples)
        models.append(model)
        data.append(list(batches(texts, tok, seq_len=seq_len, batch_size=batch_size, with_labels=False)))
    return regmean_plusplus_stats(models, data, weights=weights, **params)
