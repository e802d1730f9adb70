"""Gram matrices of every linear layer's inputs, the statistics RegMean merges with.

For a layer y = x W^T + b with inputs X (rows = every token of every example),
G = X^T X / rows is (in, in). Forward hooks on each nn.Linear (and transformers'
Conv1D, whose weight is stored (in, out)) accumulate X^T X with one matrix
product per batch in float32; nothing is kept per example. Also home to the
batch convention that fisher.py shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from mergelab.errors import StatsError
from mergelab.stats.io import StatsDict

Batch = Any


def split_batch(batch: Batch) -> tuple[tuple, dict, torch.Tensor | None]:
    """(positional inputs, keyword inputs, labels or None) of one dataloader batch.

    Accepted batches: a dict (Hugging Face style: every key but ``labels`` is passed
    as a keyword), a tuple/list ``(inputs, labels)`` or ``(inputs,)`` where inputs is
    a tensor or a dict, or a bare tensor of inputs.
    """
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return (), kwargs, batch.get("labels")
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2:
        inputs, labels = batch[0], (batch[1] if len(batch) == 2 else None)
        if isinstance(inputs, Mapping):
            return (), dict(inputs), labels
        return (inputs,), {}, labels
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    raise StatsError(f"cannot read a batch of type {type(batch).__name__}: yield a dict of model inputs "
                     "(with 'labels'), a tuple (inputs, labels), or a tensor; or pass forward=")


def batch_size(args: tuple, kwargs: dict, labels: torch.Tensor | None) -> int:
    for t in (labels, *args, *kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    raise StatsError("cannot tell the batch size: no tensor among the batch's inputs")


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, ``.logits``, ``["logits"]``, or the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise StatsError(f"the model returned {type(output).__name__}, in which no logits were found; "
                     "return a tensor of logits or an object with .logits")


def _default_forward(model: torch.nn.Module, batch: Batch) -> Any:
    args, kwargs, _ = split_batch(batch)
    return model(*args, **kwargs)


def _linear_layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, bool]]:
    """weight name -> (module, transposed) for every nn.Linear and transformers Conv1D."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional; without it there are no Conv1D layers either
        Conv1D = ()  # noqa: N806
    out = {}
    for name, mod in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(mod, torch.nn.Linear):
            out[key] = (mod, False)
        elif Conv1D and isinstance(mod, Conv1D):
            out[key] = (mod, True)
    return out


def _run_batches(model: torch.nn.Module, dataloader: Iterable[Batch], forward, mask: list) -> int:
    """Run every batch through `model` in eval mode under no_grad (mode restored), each batch's attention
    mask in mask[0] while it runs; returns the number of examples seen."""
    was_training, seen = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in dataloader:
                try:
                    args, kwargs, labels = split_batch(batch)
                    n = batch_size(args, kwargs, labels)
                except StatsError:
                    if forward is _default_forward:
                        raise
                    kwargs, n = {}, 1  # a batch only `forward` understands: count it as one example
                am = kwargs.get("attention_mask")
                mask[0] = am if isinstance(am, torch.Tensor) else None
                forward(model, batch)
                seen += n
    finally:
        model.train(was_training)
    return seen


def gram_matrices(model: torch.nn.Module, dataloader: Iterable[Batch], *,
                  forward: Callable[[torch.nn.Module, Batch], Any] | None = None) -> StatsDict:
    """Mean Gram matrix X^T X / rows of the inputs of every linear layer, keyed by its weight name.

    Rows are every token: a layer input (..., in) is flattened to (rows, in). When a
    batch is a dict with an ``attention_mask`` (batch, seq), padded positions of
    (batch, seq, in) inputs are left out. A layer called several times per
    forward accumulates every call.

    Args:
        model: any nn.Module; it runs in eval mode under no_grad (its mode is restored).
        dataloader: batches as `split_batch` reads them.
        forward: ``forward(model, batch)`` if the model needs another call (batches it
            cannot read as `split_batch` does count as one example each).

    Returns:
        StatsDict weight name -> (in, in) float32 mean Gram matrix; ``count`` = examples seen;
        ``extra["rows"]`` = rows per layer (sum = rows x mean), ``extra["transposed"]`` =
        Conv1D weights (stored (in, out)). Layers that never ran are left out and listed
        in ``extra["unused"]``.
    """
    layers = _linear_layers(model)
    if not layers:
        raise StatsError(f"{type(model).__name__} has no nn.Linear layer, so it has no Gram matrices")
    forward = forward or _default_forward
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook_for(key: str):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach()
            m = mask[0]
            if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                x = x[m.bool()]  # padded positions carry no information about the task
            x = x.reshape(-1, x.shape[-1]).float()  # (rows, in)
            if key not in sums:
                sums[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                rows[key] = 0
            sums[key].addmm_(x.T, x)
            rows[key] += x.shape[0]
        return hook

    handles = [mod.register_forward_hook(hook_for(key)) for key, (mod, _) in layers.items()]
    try:
        seen = _run_batches(model, dataloader, forward, mask)
    finally:
        for h in handles:
            h.remove()
    return StatsDict({k: (s / rows[k]).cpu() for k, s in sums.items() if rows[k]}, kind="gram", count=seen,
                    extra={"rows": {k: r for k, r in rows.items() if r},
                           "transposed": sorted(k for k, (_, t) in layers.items() if t and rows.get(k)),
                           "unused": sorted(k for k in layers if not rows.get(k))})

