"""`mergelab soup`, `mergelab sweep`, `mergelab search`: finding the best merge, candidates merged in memory.

Wires the evaluator options of `mergelab analyze` (--eval SPEC and friends) to
mergelab.search: every candidate is merged into one preallocated model in RAM
and evaluated there; only the final result is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

if TYPE_CHECKING:  # imports torch; `mergelab --help` must not
    from mergelab.cli.evaluators import EvalOptions
from mergelab.cli.analyze import eval_options
from mergelab.cli.common import fail, out
from mergelab.errors import MergeError


OBJECTIVE = typer.Option(None, "--objective", help="metric to optimise, METRIC[:max|:min] (repeatable; "
                         "default: accuracy for classifier, loss for causal-lm; names with acc/score/f1 are "
                         "maximised, others minimised)")
WORKERS = typer.Option(1, "--workers", help="candidates evaluated at once (threads, each with its own model copy)")
SEED = typer.Option(None, "--seed", help="seed of randomised methods (dare, della); default: the recipe's")
QUIET = typer.Option(False, "--quiet", help="no progress bar")


def _scorer(o: Any, first: Path, workers: int, seed: Optional[int]):
    from mergelab.cli.evaluators import make_setup
    from mergelab.search.candidate import CandidateEvaluator

    setup = make_setup(o, Path(first))
    return CandidateEvaluator.from_setup(setup, workers=workers, device=o.device or "cpu", seed=seed), setup


def _objectives(given: Optional[list[str]], spec: str) -> list:
    from mergelab.search.pareto import parse_objective

    if given:
        return [parse_objective(t) for t in given]
    if spec == "classifier":
        return [parse_objective("accuracy:max")]
    if spec == "causal-lm":
        return [parse_objective("loss:min")]
    return []


def _report_left_out(scorer: Any) -> None:
    if scorer.left_out:
        out.print(f"not in the evaluation model, so not merged in memory: {', '.join(scorer.left_out[:5])}"
                  + (" ..." if len(scorer.left_out) > 5 else ""), soft_wrap=True)


def soup(
    models: list[Path] = typer.Argument(..., help="the fine-tunes (Hugging Face folders or weight files)"),
    out_dir: Path = typer.Argument(..., help="where the soup is written (a model folder)"),
    greedy: bool = typer.Option(False, "--greedy", help="greedy soup (Wortsman et al.): best first, keep a model "
                                "only if the held-out score improves"),
    uniform: bool = typer.Option(False, "--uniform", help="uniform soup: the mean of all models (the default)"),
    objective: Optional[list[str]] = OBJECTIVE,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="output dtype (default: the inputs')"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="steps as JSON (default OUT_DIR.soup.json)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of the steps (default OUT_DIR.soup.png)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing outputs"),
    quiet: bool = QUIET, *, o: EvalOptions,
) -> None:
    """Model soups: uniform or greedy average of fine-tunes, scored on held-out data; writes the soup."""
    from mergelab.search import report as rp
    from mergelab.search.soup import greedy_soup, soup_recipe, uniform_soup

    try:
        if greedy and uniform:
            raise MergeError("give --greedy or --uniform, not both")
        json_out = json_out or out_dir.with_name(out_dir.name + ".soup.json")
        plot = plot or out_dir.with_name(out_dir.name + ".soup.png")
        for p in (out_dir, json_out, plot):
            rp.check_new(p, overwrite, protected=models)
        objs = _objectives(objective, o.spec)
        if len(objs) > 1:
            raise MergeError("a soup is chosen by one metric; give one --objective METRIC[:max|:min]")
        scorer, _ = _scorer(o, models[0], 1, None)
        shown = objs[0].metric if objs else None
        n = 2 * len(models) - 1 if greedy else len(models) + 1
        with rp.CountProgress(n, "greedy soup" if greedy else "uniform soup", enabled=not quiet) as bar:
            def score(recipe: dict, label: str) -> dict[str, float]:
                m = scorer(recipe, label)
                key = shown or (next(iter(m)) if len(m) == 1 else None)
                bar.advance(f"{label}: {key} {m[key]:.4f}" if key in m else label)
                return m

            paths = [str(m) for m in models]
            obj = objs[0] if objs else None
            result = (greedy_soup(paths, score, obj, dtype=dtype) if greedy
                      else uniform_soup(paths, score, obj, dtype=dtype))
        scorer.close()
        _report_left_out(scorer)
        out.print(rp.soup_table(result))
        import mergelab

        mergelab.merge(soup_recipe(result.members, dtype=dtype), out_dir, overwrite=overwrite)
        rp.write_json(json_out, {**result.to_dict(), "evaluator": o.spec, "out": str(out_dir)})
        rp.plot_soup(result, plot)
        name, value = result.best_single
        key = result.objective.metric
        out.print(f"[green]{result.kind} soup[/] of {len(result.members)}/{len(models)} models: {key} "
                  f"{result.metrics[key]:.4f} (best single {value:.4f}, {name}); written to {out_dir}; "
                  f"steps in {json_out} and {plot}", soft_wrap=True, highlight=False)
    except MergeError as exc:
        fail(exc)


def sweep(
    recipe: Path = typer.Argument(..., help="the recipe whose fields are varied"),
    vary: list[str] = typer.Option(..., "--vary", help="FIELD=START:STOP:NUM or FIELD=v1,v2,... e.g. "
                                   "models[0].parameters.weight=0:1:11 (repeatable: the grid is their product)"),
    zipped: bool = typer.Option(False, "--zip", help="vary the fields together (equal-length grids) instead of "
                                "over their product"),
    objective: Optional[list[str]] = OBJECTIVE,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="folder for sweep.json and sweep.png "
                                           "(default: sweep-<recipe name>)"),
    workers: int = WORKERS, seed: Optional[int] = SEED,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing sweep.json / sweep.png"),
    quiet: bool = QUIET, *, o: EvalOptions,
) -> None:
    """Grid sweep of recipe fields; every metric at every point, the Pareto front marked (table, PNG, JSON)."""
    import copy

    from mergelab.recipe import load_recipe, resolve
    from mergelab.search import report as rp
    from mergelab.search.space import read_recipe_dict, set_field
    from mergelab.search.sweep import grid_points, parse_vary, run_sweep

    try:
        out_dir = out_dir or Path(f"sweep-{recipe.stem}")
        for name in ("sweep.json", "sweep.png"):
            rp.check_new(out_dir / name, overwrite)
        data_ = read_recipe_dict(recipe)
        points = grid_points([parse_vary(v) for v in vary], zipped=zipped)
        first = copy.deepcopy(data_)
        for path, value in points[0].items():
            set_field(first, path, value)
        rec = resolve(load_recipe(first)).recipe  # every problem of the recipe before any evaluation
        scorer, _ = _scorer(o, Path(rec.input_paths()[0]), workers, seed)
        objs = _objectives(objective, o.spec) or None
        with rp.CountProgress(len(points), "sweep", enabled=not quiet) as bar:
            result = run_sweep(data_, points, scorer, objs, workers=workers, progress=bar.advance)
        scorer.close()
        _report_left_out(scorer)
        out.print(rp.sweep_table(result))
        rp.write_json(out_dir / "sweep.json", {**result.to_dict(), "recipe": str(recipe), "evaluator": o.spec})
        rp.plot_sweep(result, out_dir / "sweep.png")
        failed = sum(1 for e in result.errors if e)
        out.print(f"[green]sweep[/] of {len(points)} points ({failed} failed), {len(result.front)} on the Pareto "
                  f"front; {out_dir / 'sweep.json'}, {out_dir / 'sweep.png'}", soft_wrap=True, highlight=False)
    except MergeError as exc:
        fail(exc)


def search(
    recipe: Path = typer.Argument(..., help="a recipe with ranges, e.g. weight: {search: [0, 1]}"),
    budget: int = typer.Option(..., "--budget", help="candidates to evaluate (a resumed study counts those it has)"),
    objective: Optional[list[str]] = OBJECTIVE,
    sampler: str = typer.Option("auto", "--sampler", help="cmaes | tpe | nsga2 | random (auto: cmaes for one "
                                "objective, nsga2 for several)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="folder of the study, best.yml, search.json and "
                                           "search.png (default: search-<recipe name>); run again to resume"),
    storage: Optional[str] = typer.Option(None, "--storage", help="optuna storage URL shared by several "
                                          "processes or machines (default: sqlite file OUT/study.db)"),
    study_name: str = typer.Option("mergelab-search", "--study-name", help="name of the study in the storage"),
    search_seed: int = typer.Option(0, "--search-seed", help="seed of the sampler"),
    workers: int = WORKERS, seed: Optional[int] = SEED,
    quiet: bool = QUIET, *, o: EvalOptions,
) -> None:
    """Search recipe parameters (CMA-ES, TPE, NSGA-II); writes the best as a plain recipe `mergelab merge` runs."""
    from mergelab.recipe import load_recipe, resolve
    from mergelab.search import report as rp
    from mergelab.search.optimize import SearchSettings, check_settings, run_search
    from mergelab.search.space import find_search_params, instantiate, read_recipe_dict

    try:
        out_dir = out_dir or Path(f"search-{recipe.stem}")
        data_ = read_recipe_dict(recipe)
        params = find_search_params(data_, recipe.name)
        objs = _objectives(objective, o.spec)
        settings = SearchSettings(budget=budget, storage=storage or f"sqlite:///{(out_dir / 'study.db').resolve()}",
                                  study_name=study_name, sampler=sampler, workers=workers, seed=search_seed)
        check_settings(settings, params, objs)
        mid = {n: (p.low + p.high) / 2 for p in params for n in p.names()}
        rec = resolve(load_recipe(instantiate(data_, params, mid))).recipe  # every problem before the search
        out_dir.mkdir(parents=True, exist_ok=True)
        scorer, _ = _scorer(o, Path(rec.input_paths()[0]), workers, seed)
        with rp.CountProgress(budget, f"search ({settings.sampler})", enabled=not quiet) as bar:
            best: dict[str, float] = {}

            def on_trial(trial: Any) -> None:
                if trial.values is not None and len(objs) == 1:
                    v = trial.values[0]
                    if "v" not in best or objs[0].better(v, best["v"]):
                        best["v"] = v
                bar.advance(f"best {objs[0].metric} {best['v']:.4f}" if "v" in best else
                            ("failed" if trial.values is None else ""))

            result = run_search(data_, params, scorer, objs, settings, on_trial=on_trial)
        scorer.close()
        _report_left_out(scorer)
        _write_search(result, recipe, data_, params, objs, out_dir, o.spec, settings.storage)
    except MergeError as exc:
        fail(exc)


def _write_search(result, recipe: Path, data_: dict, params, objs, out_dir: Path, evaluator: str,
                  storage: str) -> None:
    """A finished search's table, best recipe(s), search.json and search.png."""
    import yaml

    from mergelab.search import report as rp

    out.print(rp.search_table(result))
    written = []
    for n in result.best:
        name = "best.yml" if len(objs) == 1 else f"pareto/trial-{n}.yml"
        text_ = yaml.safe_dump(result.recipe_of(n, data_, params), sort_keys=False)
        written.append(rp.write_text(out_dir / name, text_))
    rp.write_json(out_dir / "search.json", {**result.to_dict(), "recipe": str(recipe), "evaluator": evaluator,
                                            "storage": storage})
    rp.plot_search(result, out_dir / "search.png")
    out.print(f"[green]search[/]: {len(result.trials)} trials; best recipe{'s' * (len(written) > 1)} "
              f"{', '.join(map(str, written[:3]))}{' ...' if len(written) > 3 else ''}; run `mergelab merge` on "
              f"it; details in {out_dir / 'search.json'}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add soup, sweep and search to the `mergelab` command."""
    app.command("soup")(eval_options(soup))
    app.command("sweep")(eval_options(sweep))
    app.command("search")(eval_options(search))
