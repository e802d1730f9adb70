"""Permutation specs of Hugging Face transformers, from the config and the tensor names.

Three kinds of groups, as in Git Re-Basin's transformer experiments (Ainsworth
et al., 2022, arXiv:2209.04836, Sec. 5) and Verma & Elbayad, 2024 (arXiv:2403.00986):

- `residual`: one permutation of the hidden size shared by the embeddings, every
  layer's input and output projections, every norm and the output head (norms are
  per-channel, RMS/LayerNorm statistics are permutation invariant);
- `mlp.L`: the MLP hidden units of layer L (gate and up rows, down columns);
- `heads.L`: the attention heads of layer L as whole units. Rotary embeddings rotate
  pairs of dimensions *within* a head, so a head is never split; with grouped-query
  attention a unit is one key/value head together with the query heads that read it
  (query heads are stored kv-head-major: kv head j serves query heads j*G .. j*G+G-1).

GPT-2 stores its projections as Conv1D, weights (in, out): the axes are swapped
relative to nn.Linear, and c_attn's output is q|k|v, three chunks of the head group.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mergelab.align.spec import Axis, PermutationSpec
from mergelab.errors import MergeError

R = "residual"
H = "heads.{L}"
M = "mlp.{L}"
H3 = ("heads.{L}", 3)

# (name pattern after any prefix, axes); {L} in a pattern is the layer index.
_BERT = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight", (None, R)),
    (r"embeddings\.LayerNorm\.(weight|bias)", (R,)),
    (r"embeddings\.(position_ids|token_type_ids)", None),
    (r"encoder\.layer\.{L}\.attention\.self\.(query|key|value)\.weight", (H, R)),
    (r"encoder\.layer\.{L}\.attention\.self\.(query|key|value)\.bias", (H,)),
    (r"encoder\.layer\.{L}\.attention\.output\.dense\.weight", (R, H)),
    (r"encoder\.layer\.{L}\.(attention\.output|output)\.(dense\.bias|LayerNorm\.weight|LayerNorm\.bias)", (R,)),
    (r"encoder\.layer\.{L}\.intermediate\.dense\.weight", (M, R)),
    (r"encoder\.layer\.{L}\.intermediate\.dense\.bias", (M,)),
    (r"encoder\.layer\.{L}\.output\.dense\.weight", (R, M)),
    (r"pooler\.dense\.weight", (None, R)),  # the pooled output is a model output: not permuted
    (r"pooler\.dense\.bias", None),
    (r"cls\.predictions\.transform\.dense\.weight", (R, R)),  # feeds the decoder tied to the embeddings
    (r"cls\.predictions\.transform\.(dense\.bias|LayerNorm\.weight|LayerNorm\.bias)", (R,)),
    (r"cls\.predictions\.decoder\.weight", (None, R)),
    (r"cls\.predictions\.(decoder\.)?bias", None),
    (r"classifier\.(weight|bias)", None),  # reads the pooled output
]
_LLAMA = [
    (r"embed_tokens\.weight", (None, R)),
    (r"layers\.{L}\.self_attn\.[qkv]_proj\.weight", (H, R)),
    (r"layers\.{L}\.self_attn\.[qkv]_proj\.bias", (H,)),
    (r"layers\.{L}\.self_attn\.o_proj\.weight", (R, H)),
    (r"layers\.{L}\.self_attn\.o_proj\.bias", (R,)),
    (r"layers\.{L}\.self_attn\.[qk]_norm\.weight", None),  # per head_dim, the same in every head
    (r"layers\.{L}\.mlp\.(gate|up)_proj\.weight", (M, R)),
    (r"layers\.{L}\.mlp\.(gate|up)_proj\.bias", (M,)),
    (r"layers\.{L}\.mlp\.down_proj\.weight", (R, M)),
    (r"layers\.{L}\.mlp\.down_proj\.bias", (R,)),
    (r"layers\.{L}\.(input_layernorm|post_attention_layernorm)\.weight", (R,)),
    (r"norm\.weight", (R,)),
    (r"(lm_head|score)\.weight", (None, R)),
    (r"(layers\.{L}\.self_attn\.)?rotary_emb\.inv_freq", None),
]
_GPT2 = [
    (r"(wte|wpe)\.weight", (None, R)),
    (r"h\.{L}\.(ln_1|ln_2)\.(weight|bias)", (R,)),
    (r"h\.{L}\.attn\.c_attn\.weight", (R, H3)),
    (r"h\.{L}\.attn\.c_attn\.bias", (H3,)),
    (r"h\.{L}\.attn\.c_proj\.weight", (H, R)),
    (r"h\.{L}\.attn\.c_proj\.bias", (R,)),
    (r"h\.{L}\.attn\.(bias|masked_bias)", None),
    (r"h\.{L}\.mlp\.c_fc\.weight", (R, M)),
    (r"h\.{L}\.mlp\.c_fc\.bias", (M,)),
    (r"h\.{L}\.mlp\.c_proj\.weight", (M, R)),
    (r"h\.{L}\.mlp\.c_proj\.bias", (R,)),
    (r"ln_f\.(weight|bias)", (R,)),
    (r"(lm_head|score)\.weight", (None, R)),
]
_RULES = {"bert": _BERT, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2}
SUPPORTED = tuple(_RULES)
# An output head reading the residual stream; without one (BertModel, LlamaModel) the residual
# stream is itself the model's output and is left unpermuted (else the outputs come back permuted).
_HEAD = re.compile(r"(^|\.)(lm_head|score|classifier)\.weight$|(^|\.)cls\.predictions\.decoder\.weight$")


def _compiled(rules):
    return [(re.compile(r"^(?P<prefix>.*\.)?" + pat.replace("{L}", r"(?P<L>\d+)") + "$"), axes)
            for pat, axes in rules]


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        value = config.get(n) if isinstance(config, Mapping) else getattr(config, n, None)
        if value is not None:
            return value
    return default


def _sizes(kind: str, config: Any) -> tuple[int, int, int]:
    """(hidden size, units of a head group, MLP width) from a transformers config (object or dict)."""
    hidden = _get(config, "hidden_size", "n_embd")
    heads = _get(config, "num_attention_heads", "n_head")
    kv = _get(config, "num_key_value_heads", default=heads)
    inner = _get(config, "intermediate_size", "n_inner") or (4 * hidden if hidden else None)
    if not hidden or not heads or not inner:
        raise MergeError(f"{kind} config lacks hidden_size, num_attention_heads or intermediate_size; "
                         "cannot size its permutation groups")
    if heads % kv:
        raise MergeError(f"{kind} config: num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv}")
    return hidden, kv, inner


def _taps(kind: str, prefixes: set[str], layers: set[int]) -> dict[str, list[tuple[str, str]]]:
    """Where each group's units appear while the model runs (for activation matching and REPAIR)."""
    if len(prefixes) > 1:
        raise MergeError(f"the layers of this {kind} model sit under several prefixes {sorted(prefixes)}; "
                         "align one model at a time")
    p = next(iter(prefixes), "")
    names = {  # (residual stream after a layer, MLP hidden units, attention output per head)
        "bert": ("encoder.layer.{L}", "encoder.layer.{L}.output.dense", "encoder.layer.{L}.attention.output.dense"),
        "gpt2": ("h.{L}", "h.{L}.mlp.c_proj", "h.{L}.attn.c_proj"),
    }.get(kind, ("layers.{L}", "layers.{L}.mlp.down_proj", "layers.{L}.self_attn.o_proj"))
    taps: dict[str, list[tuple[str, str]]] = {R: []}
    for L in sorted(layers):
        res, mlp, att = (p + n.format(L=L) for n in names)
        taps[R].append((res, "out"))
        taps[f"mlp.{L}"] = [(mlp, "in")]
        taps[f"heads.{L}"] = [(att, "in")]
    return taps


def spec_for_hf(config: Any, shapes: Mapping[str, Sequence[int]], residual: bool | None = None) -> PermutationSpec:
    """The permutation spec of a BERT, Llama/Mistral/Qwen2 or GPT-2 state dict.

    Args:
        config: the model's transformers config (object or config.json dict).
        shapes: tensor name -> shape, for every tensor of the state dict (a state dict will do);
            names may carry any prefix (`bert.`, `model.`, `transformer.`).
        residual: permute the residual stream; default: when an output head (lm_head, score,
            classifier, BERT's MLM decoder) reads it, i.e. not for bare encoders whose hidden
            states are the output (a permuted copy would return permuted embeddings).

    Raises:
        MergeError naming the model type or the first tensor no rule covers.
    """
    kind = _get(config, "model_type")
    if kind not in _RULES:
        raise MergeError(f"no permutation rules for model_type {kind!r}; supported: {', '.join(SUPPORTED)} "
                         "(or pass a PermutationSpec, or an nn.Module torch.fx can trace)")
    hidden, kv_heads, inner = _sizes(kind, config)
    rules = _compiled(_RULES[kind])
    axes: dict[str, tuple[Axis | None, ...]] = {}
    layers: set[int] = set()
    prefixes: set[str] = set()
    for name, shape in shapes.items():
        for pattern, template in rules:
            m = pattern.match(name)
            if m is None:
                continue
            layer = m.groupdict().get("L")
            if layer is not None:
                layers.add(int(layer))
                prefixes.add(m.group("prefix") or "")
            axes[name] = _axes(template, layer) or (None,) * len(shape)
            break
        else:
            raise MergeError(f"tensor {name} matches no permutation rule of {kind}; the model has parts mergelab "
                             "cannot align yet (pass a PermutationSpec by hand)")
    groups = {R: hidden, **{f"mlp.{L}": inner for L in layers}, **{f"heads.{L}": kv_heads for L in layers}}
    if residual is None:
        residual = any(_HEAD.search(name) for name in shapes)
    if not residual:
        axes = {k: tuple(None if a is not None and a.group == R else a for a in v) for k, v in axes.items()}
    spec = PermutationSpec(groups=groups, axes=axes, taps=_taps(kind, prefixes, layers))
    return _drop_unused(spec)


def _axes(template, layer: str | None) -> tuple[Axis | None, ...] | None:
    if template is None:
        return None
    out = []
    for t in template:
        if t is None:
            out.append(None)
        elif isinstance(t, tuple):
            out.append(Axis(t[0].format(L=layer), t[1]))
        else:
            out.append(Axis(t.format(L=layer)))
    return tuple(out)


def _drop_unused(spec: PermutationSpec) -> PermutationSpec:
    """Groups no tensor uses (a model without MLP biases still has its MLP group) are removed."""
    used = {ax.group for axes in spec.axes.values() for ax in axes if ax is not None}
    spec.groups = {g: n for g, n in spec.groups.items() if g in used}
    spec.taps = {g: t for g, t in spec.taps.items() if g in used}
    return spec
