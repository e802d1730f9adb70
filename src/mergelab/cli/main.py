"""The `mergelab` command. It only wires components together; the work lives in them."""

from __future__ import annotations

import os

# Process-wide policy, set here (the command owns its process) and before torch
# is first imported: ask torch's CPU allocator for 2 MB-aligned big buffers
# marked for transparent huge pages. Merging allocates and frees tensors of
# hundreds of MB per job; with 4 KB pages the kernel's page faults and zeroing
# took a third of a TinyLlama merge's time. Set it to 0 to opt out. The library
# itself never changes the environment of a host process.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402
from rich.table import Table  # noqa: E402

from mergelab.cli.analyze import analyze_app  # noqa: E402
from mergelab.cli.common import (  # noqa: E402
    CLEAN_PARTIALS,
    OVERWRITE,
    check_outputs,
    console,
    fail,
    need_plots,
    out,
    report_partials,
    save_plot,
    user_errors,
    write_json,
)
from mergelab.errors import MergeError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Merge neural networks by combining their weights.")


def _version(value: bool) -> None:
    if value:
        from mergelab import __version__

        out.print(f"mergelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Merge neural networks by combining their weights."""


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="MergeKit-compatible YAML recipe"),
    out_dir: Path = typer.Argument(..., help="output folder (written atomically)"),
    device: str = typer.Option("cpu", help="where the maths runs: cpu, cuda, cuda:1"),
    cuda: bool = typer.Option(False, "--cuda", help="MergeKit's spelling of --device cuda"),
    seed: Optional[int] = typer.Option(None, "--seed", "--random-seed", help="seed of randomised methods (dare, della)"),
    out_shard_size: str = typer.Option("5GB", help="maximum size of an output shard: 5GB, 500MB, or MergeKit's 5B"),
    allow_crimes: bool = typer.Option(False, "--allow-crimes", help="merge models of different architectures"),
    copy_tokenizer: bool = typer.Option(True, "--copy-tokenizer/--no-copy-tokenizer",
                                        help="copy the tokenizer source's tokenizer files"),
    write_model_card: bool = typer.Option(True, "--write-model-card/--no-write-model-card",
                                          help="write a README.md model card"),
    lazy_unpickle: bool = typer.Option(False, "--lazy-unpickle", help="accepted for MergeKit recipes' command lines; "
                                       "mergelab always reads lazily"),
    low_cpu_memory: bool = typer.Option(False, "--low-cpu-memory", help="accepted; mergelab always streams"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="accepted; a merge runs no model "
                                           "code"),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="list every tensor handled specially or left out"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and stop"),
    overwrite: bool = OVERWRITE,
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="write the merge even where input "
                                         "tensors hold NaN/Inf (they are listed either way)"),
    clean_partials: bool = CLEAN_PARTIALS,
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    as_json: bool = typer.Option(False, "--json", help="print a machine-readable summary (JSON) on stdout and "
                                 "nothing else there; no progress bar"),
    offline: bool = typer.Option(False, "--offline", help="models named by Hub id (org/name[@revision]) come "
                                 "from the local Hugging Face cache only; nothing is downloaded (also: "
                                 "HF_HUB_OFFLINE=1)"),
) -> None:
    """Merge the models of RECIPE into OUT_DIR."""
    import mergelab

    with user_errors():
        if not dry_run:
            report_partials(out_dir, clean_partials)
        result = mergelab.merge(recipe, out_dir, device="cuda" if cuda else device, seed=seed,
                                out_shard_size=out_shard_size, overwrite=overwrite, dry_run=dry_run,
                                show_progress=not (quiet or as_json), allow_nonfinite=allow_nonfinite,
                                allow_crimes=allow_crimes, copy_tokenizer=copy_tokenizer,
                                write_model_card=write_model_card, offline=True if offline else None)
    if as_json:
        print(json.dumps(_plan_summary(result) if dry_run else _run_summary(result), indent=2))
        return
    if dry_run:
        _print_plan(result) if hasattr(result, "jobs") else out.print(str(result))
        return
    _print_result(result, recipe, verbose)


def _print_result(r, recipe: Path, verbose: bool) -> None:
    """The one-line summary of a finished merge, its warnings, and with --verbose every special tensor."""
    out.print(f"[green]merged[/] {r.tensors} tensors ({r.merged} by {recipe.name}'s method, "
              f"{len(r.copied)} handled specially, {len(r.left_out)} input tensors left out) "
              f"into {r.out_dir} in {r.seconds:.1f} s; read {_gb(r.bytes_read)}, wrote {_gb(r.bytes_written)}"
              f" ({r.bytes_read / max(r.seconds, 1e-9) / 1e9:.2f} GB/s)")
    if getattr(r, "nonfinite", None):
        out.print(f"[yellow]warning:[/] {len(r.nonfinite)} tensor(s) had NaN/Inf inputs (--allow-nonfinite): "
                  + ", ".join(r.nonfinite[:5]) + (" ..." if len(r.nonfinite) > 5 else ""))
    if r.left_out:
        out.print(f"left out (see {r.out_dir}/mergelab_report.json): "
                  + ", ".join(f"{t}" for _, t, _ in r.left_out[:5]) + (" ..." if len(r.left_out) > 5 else ""))
    for note in _run_summary(r).get("ignored_parameters", []):
        out.print(f"ignored: {note}", highlight=False, soft_wrap=True)
    if verbose:
        for name, how in r.copied:
            out.print(f"  {name}: {how}", highlight=False)
        for model, name, why in r.left_out:
            out.print(f"  left out {name} of {model}: {why}", highlight=False)


def _run_summary(r) -> dict:
    """The run's mergelab_report.json (what the output folder records), with where it was written."""
    report = Path(r.out_dir) / "mergelab_report.json"
    data = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {
        "tensors": r.tensors, "merged": r.merged, "seconds": round(r.seconds, 3)}
    return {"out_dir": str(r.out_dir), **data}


def _plan_summary(plan) -> dict:
    if not hasattr(plan, "jobs"):  # adapter merges describe their plan in words
        return {"dry_run": True, "plan": str(plan)}
    jobs = [{"tensor": j.name, "shape": list(j.shape), "dtype": str(j.dtype).removeprefix("torch."),
             "inputs": len(j.inputs) + (j.base is not None), "copied": j.copy, "note": j.note} for j in plan.jobs]
    return {"dry_run": True, "method": plan.method.name, "tensors": jobs, "bytes_read": plan.bytes_read,
            "bytes_written": plan.bytes_written, "ignored_parameters": list(plan.ignored),
            "left_out": [{"model": m, "tensor": t, "why": why} for m, t, why in plan.left_out]}


def _print_plan(plan) -> None:
    table = Table(title=f"plan: {plan.method.name}, {len(plan.jobs)} output tensors")
    for col in ("tensor", "shape", "dtype", "inputs"):
        table.add_column(col)
    table.add_column("how / parameters", overflow="fold")
    for job in plan.jobs[:60]:
        if job.copy:
            how = job.note or "copied"
        else:
            per = "; ".join(p.model_dump_json(by_alias=True) for p in job.model_params)
            how = f"{per} | {job.shared.model_dump_json(by_alias=True) if job.shared else ''}"
        table.add_row(job.name, str(tuple(job.shape)), str(job.dtype).removeprefix("torch."),
                      str(len(job.inputs) + (job.base is not None)), how)
    out.print(table)
    if len(plan.jobs) > 60:
        out.print(f"... {len(plan.jobs) - 60} more tensors")
    out.print(f"read {_gb(plan.bytes_read)}, write {_gb(plan.bytes_written)}; "
              f"{len(plan.left_out)} input tensors left out")
    for m, t, why in plan.left_out[:20]:
        out.print(f"  left out: {t} of {m}: {why}")
    for note in plan.ignored:
        out.print(f"ignored: {note}", highlight=False, soft_wrap=True)


@app.command("methods")
def methods_cmd(name: Optional[str] = typer.Argument(None, help="a method to describe"),
                as_json: bool = typer.Option(False, "--json", help="print the description(s) as JSON")) -> None:
    """List merge methods, or describe one with its parameters and defaults."""
    import difflib

    from mergelab.cli.catalog import method_catalog
    from mergelab.mergekit_names import not_implemented_hint

    catalog = method_catalog()  # no torch import once cached (cli/catalog.py)
    if name is not None and name not in catalog:
        close = difflib.get_close_matches(name, catalog, n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        fail(MergeError(not_implemented_hint(name, catalog)
                        or f"unknown merge method {name!r}{hint}; run `mergelab methods` for the list"))
    if as_json:
        print(json.dumps(catalog if name is None else catalog[name], indent=2))
        return
    if name is None:
        table = Table(title="merge methods")
        for col in ("method", "base", "parameters", "summary"):
            table.add_column(col)
        for mname, d in catalog.items():
            params = ", ".join(f"{k}={v['default']}" if not v["required"] else f"{k} (required)"
                               for k, v in d["parameters"].items())
            table.add_row(mname, d["base"], params, d["doc"].splitlines()[0] if d["doc"] else "")
        out.print(table)
        return
    d = catalog[name]
    table = Table(title=f"{name}: parameters")
    for col in ("parameter", "scope", "default", "meaning"):
        table.add_column(col)
    for k, v in d["parameters"].items():
        table.add_row(k, v["scope"], "required" if v["required"] else repr(v["default"]), v["description"])
    out.print(table)
    out.print(f"base model: {d['base']}; models: {d['min_models']}..{d['max_models'] or 'any'}"
              + ("; randomised (use --seed)" if d["randomized"] else "")
              + ("; statistics: `stats:` on each model" if d["needs_stats"] else "")
              + ("; the base's statistics: `base_stats:`" if d.get("uses_base_stats") else ""))
    out.print(d["doc"], highlight=False, markup=False)


@app.command()
def inspect(
    models: list[Path] = typer.Argument(..., help="model folders or weight files"),
    base: Optional[Path] = typer.Option(None, help="base model the task vectors are measured from"),
    density: float = typer.Option(0.2, help="TIES density for the trimmed sign-conflict rate"),
    spectral_layers: int = typer.Option(8, "--spectral-layers", help="spectral overlap (an SVD per model and "
                                        "matrix, the costly statistic) on this many evenly spaced layers; "
                                        "-1: every layer, 0: none"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full report as JSON"),
    plot: Optional[Path] = typer.Option(None, help="write a per-layer similarity heat-map PNG"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing --json / --plot files"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Will these models merge, and with which method? Data-free, streamed tensor by tensor."""
    from mergelab.analysis import inspect_models, recommend
    from mergelab.cli.tables import render_inspect

    inputs = [*models, *([base] if base else [])]
    with user_errors():
        check_outputs([(json_out, "file", "--json file"), (plot, "file", "--plot file")], inputs, overwrite)
        need_plots(plot)
        report = inspect_models([str(m) for m in models], base=str(base) if base else None, density=density,
                                spectral_layers=None if spectral_layers == -1 else spectral_layers,
                                show_progress=not quiet)
        advice = recommend(report)
        for table in render_inspect(report, advice):
            out.print(table)
        if json_out is not None:
            write_json(json_out, {**report.to_dict(), "recommendations": advice}, inputs=inputs,
                       overwrite=overwrite)
        if plot is not None:
            from mergelab.analysis.plots import plot_layer_similarity

            save_plot(plot_layer_similarity, report, plot, inputs=inputs, overwrite=overwrite)


app.add_typer(analyze_app, name="analyze")

stats_app = typer.Typer(help="Statistics for metric-aware merges (fisher, regmean, optimizer_aware).")
app.add_typer(stats_app, name="stats")


def _save_stats(compute, out_file: Path, kind: str, inputs: list[Path], overwrite: bool) -> None:
    """Check OUT_FILE first (never an input, never an existing file without --overwrite), compute, write atomically."""
    from mergelab.stats.io import save_stats

    check_outputs([(out_file, "file", "stats file")], inputs, overwrite)
    tensors = compute()
    save_stats(out_file, tensors, kind=kind, inputs=inputs, overwrite=overwrite)
    out.print(f"wrote {len(tensors)} {kind} tensors to {out_file} "
              f"({getattr(tensors, 'count', 0)} examples); use it as `stats: {out_file}` in a recipe")


@stats_app.command("gram")
def stats_gram(model: Path, data: Path, out_file: Path,
               max_examples: int = typer.Option(256, help="examples read from DATA"),
               seq_len: int = typer.Option(128, help="tokens per example"),
               batch_size: int = typer.Option(8), overwrite: bool = OVERWRITE) -> None:
    """Gram matrices X^T X of every linear layer's inputs (RegMean), on a text or JSONL file."""
    from mergelab.stats.hf_text import gram_for

    with user_errors():
        _save_stats(lambda: gram_for(model, data, max_examples=max_examples, seq_len=seq_len,
                                     batch_size=batch_size), out_file, "gram", [model, data], overwrite)


@stats_app.command("fisher")
def stats_fisher(model: Path, data: Path, out_file: Path,
                 kind: str = typer.Option("empirical", help="empirical (data labels) or sampled (model's own)"),
                 max_examples: int = typer.Option(64), seq_len: int = typer.Option(64),
                 batch_size: int = typer.Option(4), overwrite: bool = OVERWRITE) -> None:
    """Diagonal Fisher of a causal LM on a text or JSONL file (per-example gradients with vmap)."""
    from mergelab.stats.hf_text import fisher_for

    with user_errors():
        _save_stats(lambda: fisher_for(model, data, kind=kind, max_examples=max_examples, seq_len=seq_len,
                                       batch_size=batch_size), out_file, "fisher", [model, data], overwrite)


@stats_app.command("optimizer")
def stats_optimizer(checkpoint: Path, out_file: Path,
                    divide_by_lr: bool = typer.Option(False, help="divide metrics by the learning rate"),
                    overwrite: bool = OVERWRITE) -> None:
    """The metric of a model's own optimizer (Adam: sqrt(v_hat)+eps, SGD: 1, ...) from a Trainer checkpoint."""
    from mergelab.stats.optimizer_state import load_trainer_checkpoint

    with user_errors():
        _save_stats(lambda: load_trainer_checkpoint(checkpoint).optimizer_metrics(divide_by_lr=divide_by_lr),
                    out_file, "optimizer", [checkpoint], overwrite)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("examples/_out/demo"), "--out", help="where the demo writes its files"),
    minilm: bool = typer.Option(False, "--minilm", help="instead: merge two fine-tunes of the real MiniLM "
                                "through the whole recipe -> folder -> sentence-transformers pipeline"),
    fast: bool = typer.Option(False, "--fast", help="a reduced configuration (seconds)"),
    replicates: Optional[int] = typer.Option(None, "--replicates", min=1, help="seeds averaged in the table "
                                             "(default 5; 1 with --fast)"),
) -> None:
    """Digits: four task models from one base, merged with every method; accuracy table, PNG and JSON."""
    from mergelab.checkpoint.output import MARKER, check_output

    with user_errors():
        # The demo's folder is its own: made here and marked, so a rerun may replace its files.
        folder = check_output(out_dir, kind="folder", overwrite=True, what="demo folder")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).touch()
        if minilm:
            from mergelab.demos.minilm import run_demo

            run_demo(out_dir)
        else:
            from mergelab.demos.digits import run_digits_demo

            run_digits_demo(out_dir, fast=fast, replicates=replicates)


def _terminate(signum, frame) -> None:
    # SIGTERM unwinds like Ctrl-C: every writer's context removes its temporary folder.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise SystemExit(128 + signum)


from mergelab.cli import lora as _lora_cli  # noqa: E402  (registers extract-lora)
_lora_cli.register(app)


from mergelab.cli.search import register as _register_search; _register_search(app)  # noqa: E402,E702


from mergelab.cli import align as _align_cli; _align_cli.register(app)  # noqa: E402, E702


from mergelab.cli import moe as _moe_cli; _moe_cli.register(app)  # noqa: E402, E702


from mergelab.cli import trajectory as _trajectory_cli; _trajectory_cli.register(app)  # noqa: E402, E702


from mergelab.cli import unmerge as _unmerge_cli; _unmerge_cli.register(app)  # noqa: E402, E702
from mergelab.cli import adamerging as _adamerging_cli; _adamerging_cli.register(app)  # noqa: E402, E702
from mergelab.cli import stats_plusplus as _stats_pp_cli; _stats_pp_cli.register(stats_app)  # noqa: E402, E702


def main() -> None:
    """Entry point of the `mergelab` command.

    mergelab's own errors were turned into one line and exit code 2 inside the
    commands; any other exception is a bug, shown with its traceback.
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except Exception:  # noqa: BLE001 - the last resort: a bug, reported as one
        traceback.print_exc()
        console.print("[bold red]this is a bug in mergelab[/]: please report it with the command line and the "
                      "traceback above", highlight=False)
        sys.exit(70)


if __name__ == "__main__":
    main()
