"""Search of recipe parameters with optuna: CMA-ES, TPE, NSGA-II; resumable, parallel, fault tolerant.

Evolutionary model merging (Akiba et al., 2024, arXiv:2403.13187; mergekit-evolve)
optimises a recipe's weights and densities with CMA-ES (Hansen, 2016,
arXiv:1604.00772), one merge and one evaluation per candidate. Here the ranges
are written in the recipe (`weight: {search: [0, 1]}`, see search/space.py),
each candidate is merged in memory, and the study lives in an optuna storage:

- samplers: `cmaes` (optuna's CmaEsSampler, which runs the `cmaes` package;
  one objective), `tpe` (Bergstra et al., 2011; one or several objectives),
  `nsga2` (Deb et al., 2002; several objectives), `random`;
- resumable: the study is an SQLite file (or any optuna RDB URL) that a second
  run with the same storage continues; its budget counts finished trials;
- parallel: `workers` threads evaluate candidates at once (optuna's n_jobs),
  each with its own preallocated model; several processes or machines join the
  same study through a shared RDB URL (optuna's distributed mode: the database
  hands out the trials, each process merges and evaluates its own; every trial
  records the `worker` host:pid that ran it);
- fault tolerant: a candidate whose merge or evaluation fails is recorded as a
  failed trial with its message and the search goes on; a worker that dies
  stops sending heartbeats, and optuna's RetryHeartbeatStaleTrialCallback queues its
  candidate again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mergelab.errors import MergeError
from mergelab.search.pareto import Objective
from mergelab.search.space import SearchParam, instantiate

Score = Callable[[dict, str], dict[str, float]]
SAMPLERS = ("auto", "cmaes", "tpe", "nsga2", "random")


@dataclasses.dataclass
class SearchSettings:
    budget: int  # finished trials (complete or failed) the study should hold
    storage: str | None  # optuna RDB URL, e.g. sqlite:///out/study.db; None: in memory (not resumable)
    study_name: str = "mergelab-search"
    sampler: str = "auto"
    workers: int = 1
    seed: int | None = 0
    heartbeat_s: int = 60  # a running trial without heartbeat for 2x this long is taken as dead and retried
    max_retry: int = 2


def check_settings(s: SearchSettings, params: Sequence[SearchParam], objectives: Sequence[Objective]) -> str:
    """Validate the settings; returns the sampler that will run."""
    if s.budget < 1:
        raise MergeError(f"budget={s.budget}: a search needs a budget of at least 1 candidate", option="budget")
    if s.workers < 1:
        raise MergeError(f"workers={s.workers}: give 1 or more", option="workers")
    if not params:
        raise MergeError("the recipe has no search ranges; write a parameter as {search: [low, high]}, e.g. "
                         "weight: {search: [0, 1]}")
    if not objectives:
        raise MergeError("no objective; give objectives (METRIC[:max|:min] each)", option="objectives")
    if len({o.metric for o in objectives}) != len(objectives):
        raise MergeError("an objective is given twice")
    if s.sampler not in SAMPLERS:
        raise MergeError(f"sampler={s.sampler!r}: use one of {', '.join(SAMPLERS)}", option="sampler")
    dims = sum(p.per_layer for p in params)
    sampler = s.sampler
    if sampler == "auto":
        sampler = "nsga2" if len(objectives) > 1 else ("cmaes" if dims >= 2 else "tpe")
    if sampler == "cmaes" and len(objectives) > 1:
        raise MergeError("CMA-ES optimises one objective; use sampler='nsga2' or 'tpe' for several",
                         option="sampler")
    if sampler == "cmaes" and dims < 2:
        raise MergeError("CMA-ES needs at least two searched coordinates (the cmaes package's limit); "
                         "use sampler='tpe' for one", option="sampler")
    return sampler


def _require_optuna(sampler: str) -> None:
    import importlib.util

    missing = [m for m in ("optuna", *(("cmaes",) if sampler == "cmaes" else ())) if importlib.util.find_spec(m) is None]
    if missing:
        raise MergeError(f"search needs the package(s) {', '.join(missing)}: pip install 'mergelab[search]'")


def make_sampler(name: str, seed: int | None, n_params: int):
    import optuna

    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, 4 * n_params))
    return optuna.samplers.RandomSampler(seed=seed)


def space_key(recipe: Mapping, params: Sequence[SearchParam], objectives: Sequence[Objective]) -> str:
    """A fingerprint of what is searched, so a resumed study is known to be the same search."""
    text = json.dumps({"recipe": recipe, "params": [dataclasses.asdict(p) for p in params],
                       "objectives": [str(o) for o in objectives]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_study(s: SearchSettings, sampler_name: str, key: str, directions: list[str], n_params: int):
    import optuna
    from optuna.storages import RDBStorage

    try:  # optuna >= 4.9; its predecessor is deprecated there
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
    except ImportError:  # pragma: no cover - older optuna
        from optuna.storages import RetryFailedTrialCallback as Retry

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = None
    if s.storage is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            # SQLite lets one process write at a time; the others wait for the lock (60 s, not sqlite3's 5 s,
            # which busy processes sharing one study file exceed).
            engine = {"connect_args": {"timeout": 60}} if s.storage.startswith("sqlite") else None
            storage = RDBStorage(s.storage, engine_kwargs=engine, heartbeat_interval=s.heartbeat_s,
                                 grace_period=2 * s.heartbeat_s,
                                 heartbeat_stale_trial_callback=Retry(max_retry=s.max_retry))
    study = optuna.create_study(storage=storage, study_name=s.study_name, load_if_exists=True,
                                directions=directions, sampler=make_sampler(sampler_name, s.seed, n_params))
    have = study.user_attrs.get("mergelab_space")
    if have is None:
        study.set_user_attr("mergelab_space", key)
        study.set_user_attr("mergelab_sampler", sampler_name)
    elif have != key:
        raise MergeError(f"the study {s.study_name!r} in {s.storage} was made for another recipe, ranges or "
                         "objectives; give a new output folder (or study_name=) to start a new search",
                         option="study_name")
    return study


def finished(study) -> int:
    """Trials that count against the budget: complete and failed ones (as optuna's MaxTrialsCallback counts)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return sum(1 for t in study.trials if t.state in states)


def suggest(trial, params: Sequence[SearchParam]) -> dict[str, float]:
    coords = {}
    for p in params:
        for name in p.names():
            if p.integer:
                coords[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
            else:
                coords[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
    return coords


@dataclasses.dataclass
class SearchResult:
    trials: list[dict[str, Any]]  # number, state, params, metrics, values, error, seconds, retry_of
    objectives: list[Objective]
    best: list[int]  # trial numbers: the best (one objective) or the Pareto set (several)
    sampler: str

    def recipe_of(self, number: int, recipe: Mapping, params: Sequence[SearchParam]) -> dict:
        trial = next(t for t in self.trials if t["number"] == number)
        return instantiate(recipe, params, trial["params"])

    def to_dict(self) -> dict[str, Any]:
        return {"objectives": [str(o) for o in self.objectives], "sampler": self.sampler, "best": self.best,
                "trials": self.trials}


def collect(study, objectives: Sequence[Objective], sampler: str) -> SearchResult:
    import optuna

    rows = []
    for t in study.trials:
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                     "metrics": t.user_attrs.get("metrics"), "values": t.values, "error": t.user_attrs.get("error"),
                     "seconds": t.duration.total_seconds() if t.duration else None,
                     "retry_of": t.system_attrs.get("failed_trial"),  # a dead worker's candidate, run again
                     "worker": t.user_attrs.get("worker")})
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        best: list[int] = []
    elif len(objectives) == 1:
        best = [study.best_trial.number]
    else:
        best = sorted(t.number for t in study.best_trials)
    return SearchResult(rows, list(objectives), best, sampler)


def run_search(recipe: Mapping, params: Sequence[SearchParam], score: Score, objectives: Sequence[Objective],
               settings: SearchSettings, *, on_trial: Callable[[Any], None] | None = None) -> SearchResult:
    """Run (or continue) the search until the study holds `settings.budget` finished trials.

    Args:
        recipe: the recipe dict with `{search: ...}` ranges (model paths resolved).
        params: its search ranges (`find_search_params`).
        score: (plain recipe dict, label) -> metrics; raises MergeError for a failed candidate.
        on_trial: called after every finished trial (progress display) with the trial.
    """
    sampler = check_settings(settings, params, objectives)
    _require_optuna(sampler)
    import optuna
    from optuna.study import MaxTrialsCallback

    directions = ["maximize" if o.maximize else "minimize" for o in objectives]
    n_params = sum(p.per_layer for p in params)
    study = open_study(settings, sampler, space_key(recipe, params, objectives), directions, n_params)

    worker = f"{socket.gethostname()}:{os.getpid()}"  # which process (on which machine) ran a candidate

    options: dict[str, str | None] = {}  # error text -> the option that fixes it (this process's trials)

    def objective(trial):
        trial.set_user_attr("worker", worker)
        coords = suggest(trial, params)
        try:
            metrics = score(instantiate(recipe, params, coords), f"trial {trial.number}")
            missing = [o.metric for o in objectives if o.metric not in metrics]
            if missing:
                raise MergeError(f"objective metric {missing[0]!r} is not among the evaluator's metrics "
                                 f"({', '.join(sorted(metrics))}); name one of those in objectives",
                                 option="objectives")
        except MergeError as exc:
            trial.set_user_attr("error", str(exc))
            options[str(exc)] = exc.option
            raise
        trial.set_user_attr("metrics", metrics)
        values = [metrics[o.metric] for o in objectives]
        return values[0] if len(values) == 1 else values

    remaining = settings.budget - finished(study)
    if remaining > 0:
        callbacks = [MaxTrialsCallback(settings.budget, states=(optuna.trial.TrialState.COMPLETE,
                                                                optuna.trial.TrialState.FAIL))]
        if on_trial is not None:
            callbacks.append(lambda study, trial: on_trial(trial))
        study.optimize(objective, n_trials=remaining, n_jobs=settings.workers, catch=(MergeError,),
                       callbacks=callbacks, gc_after_trial=False)
    result = collect(study, objectives, sampler)
    ok = [t for t in result.trials if t["state"] == "COMPLETE"]
    if not ok:
        first = next((t["error"] for t in result.trials if t["error"]), "no trial ran")
        raise MergeError(f"every candidate of the search failed; the first: {first}", option=options.get(first))
    # An objective metric the evaluator does not return fails every trial the same way.
    return result
