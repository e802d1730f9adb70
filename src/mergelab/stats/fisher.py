"""Diagonal Fisher information of any classifier, from per-example gradients.

    F = 1/n sum_x E_y [ (d/dtheta log p(y | x, theta))^2 ]

with y drawn from (Matena & Raffel, 2022, arXiv:2111.09832):
    exact      the model's own predictive distribution, summed over every class
               exactly: sum_c p(c | x) (d log p(c | x))^2 (C gradients per example);
    sampled    one class sampled from p(. | x) per example (or per position of a
               sequence): an unbiased estimate of the exact Fisher at one gradient;
    empirical  the data's label (the "empirical Fisher"; biased, but cheapest).

Per-example gradients come from torch.func: grad (or jacrev over the classes for
"exact") of a functional_call, vmapped over the batch; one forward/backward per
batch, not per example. A forward that branches on tensor values (Hugging Face
attention masks with padding) cannot be vmapped; then the same function runs per
example, with a VmapFallbackWarning. The model runs in eval mode (dropout off).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils._pytree import tree_map

from mergelab.errors import StatsError
from mergelab.stats.gram import batch_size, logits_of, split_batch
from mergelab.stats.io import StatsDict

IGNORE_INDEX = -100  # positions with this label (padding) contribute nothing, as in cross-entropy
KINDS = ("exact", "sampled", "empirical")


def _take(args: tuple, kwargs: dict, labels: Any, n: int, b: int):
    """The first n examples of a batch of b: slice every tensor whose first dimension is b."""
    def cut(t):
        return t[:n] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b else t
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}, cut(labels)


def _split_static(args: tuple, kwargs: dict, b: int):
    """Per-example tensors (vmapped over) apart from everything else (closed over)."""
    def per_example(t):
        return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b
    bpos = {i: a for i, a in enumerate(args) if per_example(a)}
    bkw = {k: v for k, v in kwargs.items() if per_example(v)}
    skw = {k: v for k, v in kwargs.items() if not per_example(v)}
    return bpos, bkw, skw


def _log_likelihood(lp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over positions of log p(y) with IGNORE_INDEX positions left out; lp (..., C), y (...)."""
    keep = y != IGNORE_INDEX
    picked = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum()


def _sample_labels(logits: torch.Tensor, labels: Any, gen: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    y = torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])
    if isinstance(labels, torch.Tensor) and labels.shape == y.shape:
        y = torch.where(labels == IGNORE_INDEX, labels, y)  # keep padding masked
    return y


def diagonal_fisher(model: torch.nn.Module, dataloader: Iterable[Any], *, kind: str = "exact",
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    max_examples: int | None = None, generator: torch.Generator | None = None) -> StatsDict:
    """Diagonal Fisher of every parameter, averaged over examples, keyed by parameter name.

    Args:
        model: an nn.Module returning logits (..., C) (a tensor, ``.logits`` or a tuple
            whose first item is them); its mode is restored afterwards.
        dataloader: batches as `mergelab.stats.gram.split_batch` reads them; labels are
            needed for "empirical" only (-100 marks ignored positions).
        kind: "exact" (logits must be (batch, C)), "sampled" or "empirical"; see the module doc.
        loss_fn: for "empirical": ``loss_fn(logits, labels)`` of ONE example (no batch
            dimension) returning a scalar; default the summed cross-entropy.
        max_examples: stop after this many examples.
        generator: random source of "sampled".

    Returns:
        StatsDict parameter name -> float32 Fisher (tied parameters under every name),
        ``count`` = examples, ``extra["estimator"]`` = kind.

    Raises:
        StatsError: unknown kind, missing labels, or logits "exact" cannot handle.
    """
    if kind not in KINDS:
        raise StatsError(f"Fisher kind {kind!r} is not one of {', '.join(KINDS)}")
    if loss_fn is not None and kind != "empirical":
        raise StatsError("loss_fn applies to kind='empirical' only (the others use the model's own likelihood)")
    named = dict(model.named_parameters())
    params = {n: p.detach() for n, p in named.items()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    seen, was_training, mode = 0, model.training, {}
    model.eval()
    try:
        for batch in dataloader:
            args, kwargs, labels = split_batch(batch)
            full = b = batch_size(args, kwargs, labels)
            if max_examples is not None and seen + full > max_examples:
                b = max_examples - seen
                args, kwargs, labels = _take(args, kwargs, labels, b, full)
            if b <= 0:
                break
            for n, g2 in _batch_fisher(model, params, buffers, args, kwargs, labels, b, kind, loss_fn,
                                       generator, mode).items():
                sums[n] += g2
            seen += b
            if max_examples is not None and seen >= max_examples:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        raise StatsError("the dataloader yielded no examples, so there is no Fisher to estimate")
    out = StatsDict({n: (s / seen).cpu() for n, s in sums.items()}, kind="fisher", count=seen,
                    extra={"estimator": kind})
    by_id: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first = by_id.setdefault(id(p), n)
        if first != n:
            out[n] = out[first]  # tied weights: the same statistics under each name
    return out


class VmapFallbackWarning(UserWarning):
    """The model's forward cannot be vmapped; per-example gradients were taken one example at a time."""


def _per_example(fn, mode: dict, params, *batched, b: int):
    """vmap(fn) over the batch; if the model's forward cannot be vmapped, the same fn per example.

    Some forwards branch on tensor values (Hugging Face attention-mask code asks
    ``mask.all()``), which vmap cannot batch. Then every example runs alone: the
    same numbers, b backward passes instead of one. ``mode`` remembers the choice.
    """
    if not mode.get("loop"):
        try:
            return vmap(fn, in_dims=(None, *[0] * len(batched)))(params, *batched)
        except RuntimeError as exc:
            if "vmap" not in str(exc):
                raise
            mode["loop"] = True
            warnings.warn("the model's forward branches on tensor values, so vmap cannot batch it; computing "
                          "per-example gradients one example at a time (slower, same result)",
                          VmapFallbackWarning, stacklevel=4)
    outs = [fn(params, *[tree_map(lambda t, k=k: t[k], x) for x in batched]) for k in range(b)]
    return tree_map(lambda *xs: torch.stack(xs), *outs)


def _batch_fisher(model, params, buffers, args, kwargs, labels, b, kind, loss_fn, generator, mode):
    """Sum over the batch's examples of the squared per-example gradients: name -> tensor."""
    bpos, bkw, skw = _split_static(args, kwargs, b)

    def logits_one(p, ex_pos, ex_kw):
        """Logits (..., C) of one example: its tensors get back a batch dimension of 1."""
        full = tuple(ex_pos[i].unsqueeze(0) if i in ex_pos else a for i, a in enumerate(args))
        out = functional_call(model, (p, buffers), full, {**{k: v.unsqueeze(0) for k, v in ex_kw.items()}, **skw})
        return logits_of(out)[0]

    if kind == "exact":
        def lp_twice(p, ex_pos, ex_kw):
            lp = torch.log_softmax(logits_one(p, ex_pos, ex_kw).float(), dim=-1)
            if lp.dim() != 1:
                raise StatsError(f"kind='exact' needs logits (batch, C), got per-example shape {tuple(lp.shape)}; "
                                 "use kind='sampled' (or 'empirical') for sequence outputs")
            return lp, lp.detach()
        jac, lp = _per_example(jacrev(lp_twice, has_aux=True), mode, params, bpos, bkw, b=b)
        prob = lp.exp()  # (b, C)
        return {n: torch.einsum("bc,bc...->...", prob, j.float() ** 2) for n, j in jac.items()}

    if kind == "sampled":
        with torch.no_grad():
            logits = logits_of(functional_call(model, (params, buffers), args, kwargs))
        labels = _sample_labels(logits, labels, generator)
    elif labels is None:
        raise StatsError("kind='empirical' needs labels: yield (inputs, labels) or a dict with 'labels'")

    def loglik(p, ex_pos, ex_kw, y):
        logits = logits_one(p, ex_pos, ex_kw)
        if loss_fn is not None:
            return loss_fn(logits, y)
        return _log_likelihood(torch.log_softmax(logits.float(), dim=-1), y)

    grads = _per_example(grad(loglik), mode, params, bpos, bkw, labels, b=b)
    return {n: (g.float() ** 2).sum(0) for n, g in grads.items()}
