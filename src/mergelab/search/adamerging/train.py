"""AdaMerging: learn task-wise or layer-wise merging coefficients by entropy minimisation on unlabelled inputs.

Yang, Wang, Shen, Liu, Guo, Wang, Tao, 2024, "AdaMerging: Adaptive Model Merging for
Multi-Task Learning", ICLR 2024, arXiv:2310.02575.

    min_lambda  sum_k H(f(x_k; theta(lambda))),   theta(lambda) = theta_base + sum_k lambda_k tau_k,

H the mean prediction entropy (entropy.py) on a batch x_k of task k's unlabelled
inputs. Each step draws one batch per task, back-propagates each task's entropy
(the gradients add up, as FusionBench accumulates them), and takes one Adam step on
lambda. Defaults are FusionBench's AdaMerging configurations: lambda initialised to
0.3, Adam with lr 1e-3, 1000 steps, no clamp (`clamp=True` clamps lambda to [0, 1]
inside the merge, FusionBench's clamp_weights).

Differences from FusionBench: the model runs in eval mode (dropout off, so the
objective is deterministic given the batches; FusionBench calls module.train());
batches are drawn in a seeded order, each task's batches reshuffled after every pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.search.adamerging.entropy import entropy, output_logits, prediction_rows
from mergelab.search.adamerging.functional import MergedFunction, to_device
from mergelab.errors import MergeError


@dataclasses.dataclass
class AdaMergingResult:
    """What AdaMerging learned.

    lambdas: (K,) task-wise or (K, P) layer-wise, as merged (clamped to [0, 1] when clamp was set).
    names: the P parameter tensors, in lambda's column order. tasks: the K task names.
    losses: per step, the summed entropy over tasks at lambda before that step's update,
    then one final value at the learned lambda. task_losses: the same per task.
    aliases: tied tensor names -> the parameter they share (they get its coefficients).
    fixed: the module's floating-point buffers and frozen parameters, which keep the base's values.
    """

    granularity: str
    lambdas: Tensor
    names: list[str]
    tasks: list[str]
    losses: list[float]
    task_losses: dict[str, list[float]]
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    fixed: list[str] = dataclasses.field(default_factory=list)

    def coefficients(self) -> dict[str, list[float]]:
        """Tensor name (tied aliases included) -> its K coefficients."""
        lam = self.lambdas
        out = {n: [float(lam[k] if lam.dim() == 1 else lam[k, i]) for k in range(lam.shape[0])]
               for i, n in enumerate(self.names)}
        out.update({a: out[n] for a, n in self.aliases.items() if n in out})
        return out

    def recipe(self, base_model: str, models: Sequence[str], **kwargs: Any) -> dict[str, Any]:
        """The learned coefficients as a task_arithmetic recipe (mergelab.search.adamerging.recipe.adamerging_recipe)."""
        from mergelab.search.adamerging.recipe import adamerging_recipe

        return adamerging_recipe(self, base_model, models, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "tasks": self.tasks, "names": self.names,
                "lambdas": self.lambdas.tolist(), "losses": self.losses, "task_losses": self.task_losses}


def _task_batches(data: Mapping[str, Sequence[Any]] | Sequence[Sequence[Any]], k: int) -> dict[str, list[Any]]:
    items = list(data.items()) if isinstance(data, Mapping) else [(f"task{i}", b) for i, b in enumerate(data)]
    if len(items) != k:
        raise MergeError(f"data has {len(items)} tasks but there are {k} fine-tuned models; give one list of "
                         "unlabelled input batches per model, in the models' order", option="data")
    out = {}
    for name, batches in items:
        batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
        if not batches:
            raise MergeError(f"data of task {name!r} holds no batch", option="data")
        out[str(name)] = batches
    return out


class _BatchOrder:
    """Seeded draw of one batch per task per step; each task's batches reshuffled after every pass."""

    def __init__(self, sizes: Mapping[str, int], seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.sizes = dict(sizes)
        self.queue: dict[str, list[int]] = {t: [] for t in sizes}

    def next(self, task: str) -> int:
        if not self.queue[task]:
            self.queue[task] = torch.randperm(self.sizes[task], generator=self.gen).tolist()
        return self.queue[task].pop(0)


def task_entropy(fn: MergedFunction, params: Mapping[str, Tensor], batch: Any, head: str = "auto",
                 task_head: Callable[[Any, Any], Any] | None = None) -> Tensor:
    """The mean prediction entropy on one batch of the model with `params` (fn.params(lambda)), its output
    passed through `task_head` first when given."""
    out = fn.run(params, batch)
    return entropy(prediction_rows(output_logits(out if task_head is None else task_head(out, batch)), batch, head))


def _task_loss(fn: MergedFunction, params: Mapping[str, Tensor], batch: Any, device: torch.device, head: str,
               task_head: Callable[[Any, Any], Any] | None, *, backward: bool) -> float:
    """One task's entropy on `batch`, its gradient accumulated into lambda's when `backward` (the task's
    activations are freed after; the merge's graph is kept for the next task)."""
    loss = task_entropy(fn, params, to_device(batch, device), head, task_head)
    if backward:
        loss.backward(retain_graph=True)
    return float(loss.detach())


def _progress(enabled: bool, steps: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]AdaMerging"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("entropy {task.fields[loss]}"), TimeRemainingColumn(), disable=not enabled)


def _checked_heads(heads: Mapping[str, Any] | None, batches: Mapping[str, Any]) -> dict[str, Any]:
    """`heads` as a dict, refused when it names a task the data does not have."""
    heads = dict(heads or {})
    if set(heads) - set(batches):
        unknown = ", ".join(sorted(set(heads) - set(batches)))
        raise MergeError(f"heads names tasks the data does not have: {unknown}")
    return heads


def adamerging(base: nn.Module, models: Sequence[nn.Module | Mapping[str, Tensor]],
               data: Mapping[str, Sequence[Any]] | Sequence[Sequence[Any]], *, granularity: str = "task",
               steps: int = 1000, lr: float = 1e-3, init: float = 0.3, clamp: bool = False, seed: int = 0,
               head: str = "auto", show_progress: bool = False, device: str | torch.device = "cpu",
               base_weights: nn.Module | Mapping[str, Tensor] | None = None,
               heads: Mapping[str, Callable[[Any, Any], Any]] | None = None) -> AdaMergingResult:
    """Learn AdaMerging coefficients (see the module docstring for the objective and defaults).

    Args:
        base: the base model as an nn.Module (its forward runs every step; it is not modified).
        models: the K fine-tuned models (nn.Modules or state dicts keyed like base's).
        data: per task, a list of unlabelled input batches (a tensor, a tuple of positional inputs or a
            dict of keyword inputs such as input_ids/attention_mask); a mapping task -> batches, or a list.
        granularity: "task" (one lambda per model) or "layer" (one per model and parameter tensor).
        steps, lr: Adam steps on lambda and its learning rate. init: lambda's initial value.
        clamp: clamp lambda to [0, 1] in the merge. seed: the batch order.
        head: "auto", "classification" ((batch, classes) logits) or "lm" (next-token distributions).
        show_progress: a rich progress bar with the entropy. device: where the forward passes run (cpu, cuda).
        base_weights: the base's weights when they are not `base`'s own.
        heads: task -> a fixed function (output, batch) -> that task's logits, from the merged model's
            output on the batch (task-specific classification heads over a merged encoder, as FusionBench's
            CLIP AdaMerging); tasks without one read the logits from the output itself.
    """
    if steps < 0:
        raise MergeError(f"steps must be >= 0, got {steps}", option="steps")
    from mergelab.device import resolve_device

    dev = resolve_device(device)
    fn = MergedFunction(base, models, granularity=granularity, base=base_weights).to(dev)
    batches = _task_batches(data, len(models))
    heads = _checked_heads(heads, batches)
    order = _BatchOrder({t: len(b) for t, b in batches.items()}, seed)
    lam = nn.Parameter(fn.init(init).to(dev))
    opt = torch.optim.Adam([lam], lr=lr)
    losses: list[float] = []
    task_losses: dict[str, list[float]] = {t: [] for t in batches}
    was_training, grad_was = base.training, torch.is_grad_enabled()
    base.eval()
    try:
        with _progress(show_progress, steps) as bar:
            bar_task = bar.add_task("adamerging", total=steps, loss="-")
            for step in range(steps + 1):  # the last pass only measures the learned lambda
                torch.set_grad_enabled(step < steps)
                params = fn.params(lam.clamp(0, 1) if clamp else lam)  # merged once per step, as FusionBench
                per_task = {task: _task_loss(fn, params, tb[order.next(task)], dev, head, heads.get(task),
                                             backward=step < steps) for task, tb in batches.items()}
                for task, value in per_task.items():
                    task_losses[task].append(value)
                losses.append(sum(per_task.values()))
                if step < steps:
                    opt.step()
                    opt.zero_grad()
                    bar.update(bar_task, advance=1, loss=f"{losses[-1]:.4f}")
    finally:
        torch.set_grad_enabled(grad_was)
        base.train(was_training)
    final = (lam.detach().clamp(0, 1) if clamp else lam.detach()).cpu().clone()
    return AdaMergingResult(granularity, final, list(fn.names), list(batches), losses, task_losses,
                            fn.aliases(), sorted(n for n, t in fn.fixed.items() if t.is_floating_point()))
