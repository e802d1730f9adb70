"""`mergelab analyze`: interpolation paths, scaling curves, loss planes and the effective noise scale.

A recipe in torchtune's sense: it turns command-line options into a template model
and an evaluator, reads the checkpoints, and hands them to `mergelab.analysis`.

The evaluator options (`--eval` SPEC and friends) are turned into a template
model and an evaluator by `mergelab.cli.evaluators`.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

if TYPE_CHECKING:  # these import torch: the commands load them, so `mergelab --help` stays fast
    from mergelab.analysis import paths as ap
    from mergelab.cli.evaluators import EvalOptions
from mergelab.cli import tables
from mergelab.cli.common import check_outputs, console, fail, need_plots, out, save_plot, write_json
from mergelab.errors import MergeError

analyze_app = typer.Typer(no_args_is_help=True, help=(
    "Why does a merge work or fail? Paths, barriers, scaling curves and loss planes (these take an evaluator, "
    "--eval) and the effective noise scale. --eval causal-lm: loss of a Hugging Face causal LM on --text or "
    "--tokens; --eval classifier: loss and accuracy on --data of the network --model builds; --eval "
    "module:function (or file.py:function): your function, given the model (with --model) or else the "
    "state dict, returning a dict of metrics."))

# The evaluator options, defined once: `eval_options` adds them to a command (analyze path, scaling,
# plane; soup, sweep, search), which receives them together as one EvalOptions `o`.
EVAL_OPTIONS: dict[str, tuple[Any, Any]] = {  # EvalOptions field -> (type, typer option)
    "spec": (str, typer.Option(..., "--eval", help="causal-lm | classifier | module:function | file.py:function")),
    "model": (Optional[str], typer.Option(None, "--model", help="module:factory or file.py:factory, a "
              "zero-argument function returning the nn.Module (needed by classifier; optional for a user "
              "function)")),
    "data": (Optional[Path], typer.Option(None, "--data", help="classifier data: a torch file of {'X': inputs, "
             "'y': labels} or (X, y)")),
    "text": (Optional[Path], typer.Option(None, "--text", help="causal-lm: a UTF-8 text file")),
    "tokens": (Optional[Path], typer.Option(None, "--tokens", help="causal-lm: a torch file holding a 1-D tensor "
               "of token ids")),
    "tokenizer": (Optional[Path], typer.Option(None, "--tokenizer", help="causal-lm: tokenizer folder for --text "
                  "(default: first model)")),
    "seq_len": (int, typer.Option(128, "--seq-len", help="causal-lm: tokens predicted per window")),
    "max_batches": (int, typer.Option(16, "--max-batches", help="causal-lm: batches evaluated at each point")),
    "batch_size": (Optional[int], typer.Option(None, "--batch-size", help="examples per forward pass "
                   "(classifier 256, causal-lm 4)")),
    "bn_data": (Optional[Path], typer.Option(None, "--bn-data", help="recompute batch-norm statistics at every "
                "point from these inputs (a tensor, {'X': ...} or (X, y) torch file)")),
    "device": (Optional[str], typer.Option(None, "--device", help="where the model runs: cpu (default), cuda, "
               "cuda:1")),
}


def eval_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a typer command the evaluator options; it takes them as one keyword argument `o: EvalOptions`.

    The options are appended to the command's own (keyword-only, in EVAL_OPTIONS order);
    typer reads the wrapper's signature and annotations.
    """
    own = [p for name, p in inspect.signature(command).parameters.items() if name != "o"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, (kind, option) in EVAL_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        from mergelab.cli.evaluators import EvalOptions

        o = EvalOptions(**{name: kwargs.pop(name) for name in EVAL_OPTIONS})
        return command(o=o, **kwargs)

    hints = typing.get_type_hints(command, localns={"EvalOptions": Any})  # `o` is not among the options
    wrapper.__signature__ = inspect.Signature([p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
                                              + added)
    wrapper.__annotations__ = {**{p.name: hints.get(p.name, p.annotation) for p in own},
                               **{name: kind for name, (kind, _) in EVAL_OPTIONS.items()}}
    return wrapper


JSON_OUT = typer.Option(None, "--json", help="write the full result as JSON")
PLOT = typer.Option(None, "--plot", help="write a PNG plot")
OVERWRITE = typer.Option(False, "--overwrite", help="replace existing --json / --plot files")


def _outputs(json_out: Optional[Path], plot: Optional[Path], inputs: list[Path], overwrite: bool) -> None:
    """Check the --json / --plot paths before any evaluation starts."""
    check_outputs([(json_out, "file", "--json file"), (plot, "file", "--plot file")], inputs, overwrite)
    need_plots(plot)


# ----------------------------------------------------------------------------- headlines


def path_headline(r: ap.PathResult) -> dict[str, float]:
    """Barrier of every metric and its merge gain (midpoint minus the endpoints' mean)."""
    return {**{f"{m} barrier": v for m, v in r.barriers.items()},
            **{f"{m} merge gain": v for m, v in r.merge_gain.items()}}


def plane_headline(r: ap.PlaneResult) -> dict[str, dict[str, Any]]:
    """Per metric, the best grid point (min for losses, max for accuracy-like) and the best model."""
    from mergelab.analysis import paths as ap

    heads = {}
    for m, rows in r.metrics.items():
        pick = max if m in ap.MAXIMIZED else min
        value, iy, ix = pick((v, iy, ix) for iy, row in enumerate(rows) for ix, v in enumerate(row))
        best_model = pick(r.point_metrics, key=lambda label: r.point_metrics[label][m])
        heads[m] = {"grid_best": value, "at": [r.x[ix], r.y[iy]],
                    "best_model": best_model, "best_model_value": r.point_metrics[best_model][m]}
    return heads


def _print_headline(title: str, items: Mapping[str, Any]) -> None:
    def fmt(key: str, v: Any) -> str:
        return f"{v:{'+' if 'gain' in key else ''}.4g}" if isinstance(v, float) else str(v)

    text = "; ".join(f"{k} {fmt(k, v)}" for k, v in items.items())
    out.print(f"[bold]{title}:[/] {text}", highlight=False, soft_wrap=True)


def _finish(payload: dict[str, Any], json_out: Optional[Path], plot: Optional[Path], plotter: Any,
            result: Any, inputs: list[Path], overwrite: bool) -> None:
    if json_out is not None:
        write_json(json_out, payload, inputs=inputs, overwrite=overwrite)
    if plot is not None:
        save_plot(plotter, result, plot, inputs=inputs, overwrite=overwrite)


# ----------------------------------------------------------------------------- commands


@analyze_app.command("path")
@eval_options
def path_cmd(
    model_a: Path = typer.Argument(..., help="model at alpha = 0 (folder or weight file)"),
    model_b: Path = typer.Argument(..., help="model at alpha = 1"),
    points: int = typer.Option(11, "--points", help="evenly spaced alphas in [0, 1] (0.5 is always added)"),
    slerp: bool = typer.Option(False, "--slerp", help="spherical interpolation per tensor instead of linear"),
    json_out: Optional[Path] = JSON_OUT, plot: Optional[Path] = PLOT, overwrite: bool = OVERWRITE, *,
    o: EvalOptions,
) -> None:
    """Metrics along the path from A to B: loss and accuracy barriers, merge gain at the midpoint."""
    from mergelab.analysis import paths as ap
    from mergelab.cli.evaluators import prepare

    inputs = [model_a, model_b]
    try:
        _outputs(json_out, plot, inputs, overwrite)
        setup, (a, b) = prepare(o, [model_a, model_b])
        result = ap.interpolation_path(setup.template, a, b, setup.evaluator, points=points,
                                       method="slerp" if slerp else "linear", refresh_bn=setup.refresh_bn)
        out.print(tables.render_path(result))
        head = path_headline(result)
        _print_headline("path", head)
        from mergelab.analysis.plots import plot_path

        _finish({**result.to_dict(), "models": [str(model_a), str(model_b)], "evaluator": setup.description,
                 "headline": head}, json_out, plot, plot_path, result, inputs, overwrite)
    except MergeError as exc:
        fail(exc)


def parse_lambdas(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MergeError(f"--lambdas {text!r}: give comma-separated numbers, e.g. 0,0.25,0.5,1") from None
    if not values:
        raise MergeError("--lambdas is empty; give comma-separated numbers, e.g. 0,0.25,0.5,1")
    return values


@analyze_app.command("scaling")
@eval_options
def scaling_cmd(
    base: Path = typer.Argument(..., help="the pretrained model the task vectors are measured from"),
    finetuned: list[Path] = typer.Argument(..., help="its fine-tunes"),
    lambdas: str = typer.Option(",".join(f"{i / 10:g}" for i in range(11)), "--lambdas",
                                help="scaling coefficients, comma-separated"),
    select: str = typer.Option("loss", "--select", help="metric that picks the best lambda (accuracy: highest)"),
    json_out: Optional[Path] = JSON_OUT, plot: Optional[Path] = PLOT, overwrite: bool = OVERWRITE, *,
    o: EvalOptions,
) -> None:
    """Task arithmetic's curve: metrics of base + lambda * sum_i (FT_i - base), and the best lambda."""
    from mergelab.analysis import paths as ap
    from mergelab.cli.evaluators import prepare

    inputs = [base, *finetuned]
    try:
        _outputs(json_out, plot, inputs, overwrite)
        grid = parse_lambdas(lambdas)
        setup, (base_sd, *tasks) = prepare(o, [base, *finetuned])
        result = ap.scaling_curve(setup.template, base_sd, tasks, setup.evaluator, grid,
                                  refresh_bn=setup.refresh_bn, select=select)
        out.print(tables.render_scaling(result))
        head = {"best lambda": result.best_lambda, f"{result.select} there": result.best_value}
        _print_headline("scaling", head)
        from mergelab.analysis.plots import plot_scaling_curve

        _finish({**result.to_dict(), "base": str(base), "models": [str(m) for m in finetuned],
                 "evaluator": setup.description}, json_out, plot, plot_scaling_curve, result, inputs, overwrite)
    except MergeError as exc:
        fail(exc)


@analyze_app.command("plane")
@eval_options
def plane_cmd(
    model_o: Path = typer.Argument(..., help="origin of the plane (e.g. the base model)"),
    model_a: Path = typer.Argument(..., help="second model: fixes the x axis"),
    model_b: Path = typer.Argument(..., help="third model: fixes the plane"),
    grid: int = typer.Option(15, "--grid", help="points per axis (grid x grid evaluations)"),
    margin: float = typer.Option(0.2, "--margin", help="share of the models' span added on each side"),
    extra: Optional[list[Path]] = typer.Option(None, "--extra", help="another model (e.g. a merge) to place "
                                               "on the plane; repeatable"),
    metric: Optional[str] = typer.Option(None, "--metric", help="metric to plot (default: loss)"),
    json_out: Optional[Path] = JSON_OUT, plot: Optional[Path] = PLOT, overwrite: bool = OVERWRITE, *,
    o: EvalOptions,
) -> None:
    """Metrics on a grid in the plane through three models (Garipov et al., 2018), with the best grid point."""
    from mergelab.analysis import paths as ap
    from mergelab.analysis.eval_setup import model_labels
    from mergelab.cli.evaluators import prepare

    paths = [model_o, model_a, model_b, *(extra or [])]
    try:
        _outputs(json_out, plot, paths, overwrite)
        labels = model_labels(paths)
        setup, states = prepare(o, paths)
        result = ap.plane(setup.template, *states[:3], setup.evaluator, grid=grid, margin=margin,
                          refresh_bn=setup.refresh_bn, names=labels[:3], extra=dict(zip(labels[3:], states[3:])))
        out.print(tables.render_plane(result))
        head = plane_headline(result)
        for m, h in head.items():
            _print_headline(f"plane {'max' if m in ap.MAXIMIZED else 'min'} {m}",
                            {"grid": h["grid_best"], "at (x, y)": f"({h['at'][0]:.4g}, {h['at'][1]:.4g})",
                             f"best model {h['best_model']}": h["best_model_value"]})
        from mergelab.analysis.plots import plot_plane

        _finish({**result.to_dict(), "models": [str(p) for p in paths], "evaluator": setup.description,
                 "headline": head}, json_out, plot, functools.partial(plot_plane, metric=metric), result,
                paths, overwrite)
    except MergeError as exc:
        fail(exc)


@analyze_app.command("noise-scale")
def noise_scale_cmd(
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate"),
    batch: Optional[int] = typer.Option(None, "--batch", help="examples per optimizer step, all devices and "
                                        "accumulation steps together"),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="heavy-ball momentum or Adam's beta1 "
                                             "(default 0 with --lr, read from the run with --trainer-state)"),
    k: float = typer.Option(1.0, "--k", help="power of 1/(1 - m): 1 the SDE temperature, 2 counts momentum twice"),
    aug_var: float = typer.Option(1.0, "--aug-var", help="factor on the gradient-noise variance from augmentation"),
    trainer_state: Optional[Path] = typer.Option(None, "--trainer-state", help="a Trainer run or checkpoint "
                                                 "folder, or its training_args.json / trainer_state.json"),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="data-parallel processes of that run"),
    json_out: Optional[Path] = JSON_OUT,
    overwrite: bool = OVERWRITE,
) -> None:
    """Effective noise scale S = lr / (B (1 - m)^k) x v_aug of a training setup (arXiv:2510.04686)."""
    from mergelab.analysis.noise_scale import (
        NoiseScale,
        effective_noise_scale,
        noise_scale_from_trainer,
    )
    from mergelab.cli.tables import render_noise_scale

    inputs = [trainer_state] if trainer_state is not None else []
    try:
        _outputs(json_out, None, inputs, overwrite)
        if trainer_state is not None:
            if lr is not None or batch is not None:
                raise MergeError("give either --trainer-state or --lr and --batch, not both")
            result = noise_scale_from_trainer(trainer_state, world_size=world_size, momentum=momentum, k=k,
                                              augmentation_variance=aug_var)
        else:
            if lr is None or batch is None:
                raise MergeError("give --lr and --batch (the global batch size), or --trainer-state RUN_DIR")
            if world_size is not None:
                raise MergeError("--world-size is read only with --trainer-state; give --batch as the global "
                                 "batch size (per device x accumulation steps x devices)")
            m = momentum or 0.0
            s = effective_noise_scale(lr, batch, m, k=k, augmentation_variance=aug_var)
            result = NoiseScale(s, lr, batch, m, k, aug_var, notes=[])
        out.print(render_noise_scale(result))
        _print_headline("noise scale", {"S": result.noise_scale})
        if json_out is not None:
            write_json(json_out, result.to_dict(), inputs=inputs, overwrite=overwrite)
    except MergeError as exc:
        fail(exc)
