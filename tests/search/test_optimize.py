"""The search: convergence on a convex quadratic, resuming, failed candidates, bad input, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

pytest.importorskip("optuna")
pytest.importorskip("cmaes")

import mergelab  # noqa: E402
from mergelab.analysis.eval_setup import function_setup  # noqa: E402
from mergelab.errors import MergeError, RecipeError  # noqa: E402
from mergelab.search.candidate import CandidateEvaluator  # noqa: E402
from mergelab.search.optimize import SearchSettings, run_search  # noqa: E402
from mergelab.search.pareto import Objective  # noqa: E402
from mergelab.search.space import find_search_params, instantiate  # noqa: E402

from search_toys import linear_recipe, toy_spec, unit_models  # noqa: E402,F401 (a fixture)

RANGE = {"search": [0.0, 1.0]}
LOSS = [Objective("loss", False)]


def _scorer(first, fn: str, workers: int = 1) -> CandidateEvaluator:
    return CandidateEvaluator.from_setup(function_setup(toy_spec(fn), first), workers=workers)


def _settings(tmp_path, budget: int, memory: bool = True, **kw) -> SearchSettings:
    """In-memory studies are fast; SQLite ones (`memory=False`) are what resuming and retrying need."""
    return SearchSettings(budget=budget, storage=None if memory else f"sqlite:///{tmp_path / 'study.db'}", **kw)


@pytest.mark.parametrize("sampler", ["cmaes"])  # TPE runs in the CLI test
def test_search_converges_to_the_quadratics_minimum(unit_models, tmp_path, sampler):
    # The merge is (w1, w2) exactly; loss = (w1 - 0.3)^2 + 2 (w2 - 0.7)^2 has its minimum 0 at (0.3, 0.7).
    recipe = linear_recipe(unit_models, RANGE, RANGE)
    params = find_search_params(recipe)
    r = run_search(recipe, params, _scorer(unit_models["e1"], "quadratic"), LOSS,
                   _settings(tmp_path, 60, sampler=sampler, seed=1))
    best = next(t for t in r.trials if t["number"] == r.best[0])
    assert len(r.trials) == 60 and r.sampler == sampler
    assert best["params"]["models[0].parameters.weight"] == pytest.approx(0.3, abs=0.05)
    assert best["params"]["models[1].parameters.weight"] == pytest.approx(0.7, abs=0.05)
    assert best["metrics"]["loss"] < 2e-3
    # The best recipe is a plain recipe that `mergelab merge` runs, giving that point.
    plain = r.recipe_of(r.best[0], recipe, params)
    assert plain["models"][0]["parameters"]["weight"] == best["params"]["models[0].parameters.weight"]
    mergelab.merge(yaml.safe_load(yaml.safe_dump(plain)), tmp_path / "best")
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "best" / "model.safetensors"))["w"]
    assert w.tolist() == pytest.approx([best["params"]["models[0].parameters.weight"],
                                        best["params"]["models[1].parameters.weight"]], rel=1e-6)


def test_a_search_resumes_from_its_study(unit_models, tmp_path):
    recipe = linear_recipe(unit_models, RANGE, RANGE)
    params = find_search_params(recipe)
    score = _scorer(unit_models["e1"], "quadratic")
    first = run_search(recipe, params, score, LOSS, _settings(tmp_path, 6, False, sampler="random"))
    again = run_search(recipe, params, score, LOSS, _settings(tmp_path, 10, False, sampler="random"))
    assert len(first.trials) == 6 and len(again.trials) == 10
    assert [t["params"] for t in again.trials[:6]] == [t["params"] for t in first.trials]
    # A budget already reached runs nothing more.
    assert len(run_search(recipe, params, score, LOSS, _settings(tmp_path, 8, False, sampler="random")).trials) == 10
    # Another recipe cannot continue this study.
    other = linear_recipe(unit_models, {"search": [0.0, 0.5]}, RANGE)
    with pytest.raises(MergeError, match=r"another recipe.*study_name=") as exc:
        run_search(other, find_search_params(other), score, LOSS, _settings(tmp_path, 12, False, sampler="random"))
    assert exc.value.option == "study_name"


def test_the_candidate_of_a_dead_worker_is_retried(unit_models, tmp_path):
    import time

    import optuna

    from mergelab.search.optimize import open_study, space_key

    recipe = linear_recipe(unit_models, RANGE, RANGE)
    params = find_search_params(recipe)
    settings = _settings(tmp_path, 3, False, sampler="random", heartbeat_s=1)
    # A worker takes a candidate, sends one heartbeat, and dies.
    study = open_study(settings, "random", space_key(recipe, params, LOSS), ["minimize"], 2)
    dead = study.ask({"models[0].parameters.weight": optuna.distributions.FloatDistribution(0, 1),
                      "models[1].parameters.weight": optuna.distributions.FloatDistribution(0, 1)})
    study._storage.record_heartbeat(dead._trial_id)
    # Past the grace period of 2 heartbeats (2 s) for sure: SQLite stores heartbeats and reads "now" to
    # the whole second, so 2.5 s of real time can compare as only 2 s (then the trial is not yet stale).
    time.sleep(3.5)
    r = run_search(recipe, params, _scorer(unit_models["e1"], "quadratic"), LOSS, settings)
    states = {t["number"]: t["state"] for t in r.trials}
    assert states[dead.number] == "FAIL"
    retried = [t for t in r.trials if t["retry_of"] == dead.number]
    assert len(retried) == 1 and retried[0]["state"] == "COMPLETE" and retried[0]["params"] == dead.params


@pytest.mark.slow
def test_two_processes_share_one_study(unit_models, tmp_path):
    """optuna's distributed mode: `mergelab search` processes given one storage URL split one budget."""
    import subprocess
    import sys

    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(linear_recipe(unit_models, RANGE, RANGE)))
    (tmp_path / "meet").mkdir()
    env = {**os.environ, "MERGELAB_TEST_RENDEZVOUS": str(tmp_path / "meet")}
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    import optuna

    optuna.storages.RDBStorage(storage).engine.dispose()  # the schema, made once (as a database server's is)
    procs = [subprocess.Popen([sys.executable, "-m", "mergelab.cli", "search", str(recipe), "--eval",
                               toy_spec("rendezvous"), "--objective", "loss", "--budget", "6", "--sampler", "random",
                               "--search-seed", str(i), "--storage", storage, "--out", str(tmp_path / f"w{i}"),
                               "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    # The second process to finish sees every trial of the study.
    trials = max((json.loads((tmp_path / f"w{i}" / "search.json").read_text())["trials"] for i in range(2)), key=len)
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert 6 <= len(done) <= 7, (trials, outs)  # the budget, plus at most the other process's candidate in flight
    assert len({t["number"] for t in trials}) == len(trials)  # no candidate handed out twice
    assert len({t["worker"] for t in done}) == 2, (trials, outs)  # both processes evaluated candidates


def test_a_failing_candidate_is_recorded_and_the_search_goes_on(unit_models, tmp_path):
    # With two workers, which random draw lands on which weight depends on thread timing. Drawing the
    # first weight from [0.6, 1] makes each trial fail (x > 0.8) or succeed with probability 1/2, so
    # every interleaving of the 16 trials has both (was [0, 1]: no failure in 2.8% of interleavings).
    recipe = linear_recipe(unit_models, {"search": [0.6, 1.0]}, RANGE)
    r = run_search(recipe, find_search_params(recipe), _scorer(unit_models["e1"], "flaky", workers=2), LOSS,
                   _settings(tmp_path, 16, sampler="random", seed=3, workers=2))
    failed = [t for t in r.trials if t["state"] == "FAIL"]
    ok = [t for t in r.trials if t["state"] == "COMPLETE"]
    assert len(r.trials) == 16 and failed and ok
    assert all(t["params"]["models[0].parameters.weight"] > 0.8 for t in failed)
    assert all("evaluation crashed" in t["error"] for t in failed)
    assert all(t["params"]["models[0].parameters.weight"] <= 0.8 for t in ok)


def test_several_objectives_give_the_pareto_set(unit_models, tmp_path):
    recipe = linear_recipe(unit_models, RANGE, RANGE)
    objs = [Objective("x_score", True), Objective("y_score", False)]
    r = run_search(recipe, find_search_params(recipe), _scorer(unit_models["e1"], "coords"), objs,
                   _settings(tmp_path, 20, seed=0))
    assert r.sampler == "nsga2"
    done = {t["number"]: (t["metrics"]["x_score"], t["metrics"]["y_score"]) for t in r.trials if t["metrics"]}
    for n in r.best:  # nothing dominates a member of the Pareto set
        x, y = done[n]
        assert not any(a >= x and b <= y and (a > x or b < y) for a, b in done.values())


def test_ranges_are_checked_against_each_parameters_domain(unit_models):
    ties = {"merge_method": "ties", "base_model": str(unit_models["e1"]),
            "models": [{"model": str(unit_models["e2"]),
                        "parameters": {"weight": 1.0, "density": {"search": [0.0, 1.0]}}}]}
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.density\.search: range \[0, 1\] leaves the "
                                          r"valid domain of ties's density at 0; density must be a number with 0 < density"):
        find_search_params(ties)
    bad = linear_recipe(unit_models, {"search": [1.0, 0.5]}, {"search": [0, 1], "per_layr": 2})
    with pytest.raises(RecipeError) as info:
        find_search_params(bad)
    assert len(info.value.problems) == 2
    assert "low 1 is not below high 0.5" in str(info.value) and "per_layr" in str(info.value)
    layered = linear_recipe(unit_models, {"search": [0.1, 1.0], "per_layer": 3}, 1.0)
    params = find_search_params(layered)
    assert params[0].names() == [f"models[0].parameters.weight[{k}]" for k in range(3)]
    plain = instantiate(layered, params, {n: 0.5 for n in params[0].names()})
    assert plain["models"][0]["parameters"]["weight"] == [0.5, 0.5, 0.5]


def test_budget_zero_and_other_bad_settings(unit_models, tmp_path):
    recipe = linear_recipe(unit_models, RANGE, RANGE)
    params = find_search_params(recipe)
    score = _scorer(unit_models["e1"], "quadratic")
    with pytest.raises(MergeError, match=r"budget=0: .*budget of at least 1") as exc:
        run_search(recipe, params, score, LOSS, _settings(tmp_path, 0))
    assert exc.value.option == "budget"
    with pytest.raises(MergeError, match=r"one objective; use sampler='nsga2'") as exc:
        run_search(recipe, params, score, [*LOSS, Objective("x", True)], _settings(tmp_path, 5, sampler="cmaes"))
    assert exc.value.option == "sampler"
    with pytest.raises(MergeError, match="no search ranges"):
        run_search(recipe, [], score, LOSS, _settings(tmp_path, 5))
    with pytest.raises(MergeError, match=r"'acc' is not among.*in objectives") as exc:
        run_search(recipe, params, score, [Objective("acc", True)], _settings(tmp_path, 2, sampler="random"))
    assert exc.value.option == "objectives"


def _cli(*args, cwd):
    from typer.testing import CliRunner

    from mergelab.cli.main import app

    old = os.getcwd()
    os.chdir(cwd)  # relative model paths in the recipe resolve against its folder, outputs against cwd
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def test_cli_search_soup_and_sweep(unit_models, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(linear_recipe({k: v.name for k, v in unit_models.items()}, RANGE, RANGE)))
    res = _cli("search", recipe, "--eval", toy_spec("quadratic"), "--objective", "loss", "--budget", "5",
               "--sampler", "tpe", "--out", tmp_path / "s", "--quiet", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    best = yaml.safe_load((tmp_path / "s" / "best.yml").read_text())
    report = json.loads((tmp_path / "s" / "search.json").read_text())
    assert len(report["trials"]) == 5 and (tmp_path / "s" / "search.png").stat().st_size > 0
    assert isinstance(best["models"][0]["parameters"]["weight"], float)
    assert _cli("merge", tmp_path / "s" / "best.yml", tmp_path / "merged", cwd=tmp_path).exit_code == 0

    res = _cli("search", recipe, "--eval", toy_spec("quadratic"), "--budget", "0", cwd=tmp_path)
    assert res.exit_code == 2 and "budget of at least 1" in res.output

    res = _cli("sweep", recipe, "--vary", "models[0].parameters.weight=0:1:3", "--vary",
               "models[1].parameters.weight=1:0:3", "--zip", "--eval", toy_spec("coords"), "--out",
               tmp_path / "sw", "--quiet", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sweep["front"] == [0, 1, 2] and (tmp_path / "sw" / "sweep.png").is_file()

    vecs = {"A": (1.0, 0.0), "B": (-1.0, 0.1), "C": (0.0, 2.0), "D": (0.9, 0.1)}
    from search_toys import write_vectors

    m = write_vectors(tmp_path, vecs)
    res = _cli("soup", *[m[k] for k in "ABCD"], tmp_path / "soup", "--greedy", "--eval", toy_spec("neg_dist"),
               "--quiet", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    steps = json.loads((tmp_path / "soup.soup.json").read_text())
    assert steps["members"] == [str(m["D"]), str(m["B"])]
    from safetensors.torch import load_file

    assert torch.allclose(load_file(str(tmp_path / "soup" / "model.safetensors"))["w"], torch.tensor([-0.05, 0.1]))
    res = _cli("soup", m["A"], m["B"], tmp_path / "soup", "--eval", toy_spec("neg_dist"), cwd=tmp_path)
    assert res.exit_code == 2 and "already exists" in res.output
