"""Model soups: the uniform average of fine-tunes, and the greedy soup.

Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time", arXiv:2203.05482.

    uniform soup:  theta = (1/N) sum_i theta_i
    greedy soup:   sort the ingredients by held-out score, best first;
                   soup = {theta_(1)}; for i = 2..N: keep theta_(i) if
                   score(mean(soup + {theta_(i)})) > score(mean(soup))

The paper's Algorithm 1 writes >=; its released code (and this) keeps an
ingredient only when the soup strictly improves, so a model that changes
nothing is left out. Every candidate soup is a linear merge with equal
weights, merged in memory and scored by the evaluator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from mergelab.errors import MergeError
from mergelab.search.pareto import Objective

Score = Callable[[dict, str], dict[str, float]]  # (recipe dict, label) -> metrics


def soup_recipe(models: Sequence[str], *, dtype: str | None = None) -> dict[str, Any]:
    """The uniform soup of `models` as a recipe: linear, equal weights, normalised."""
    rec: dict[str, Any] = {"merge_method": "linear",
                           "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
    if dtype:
        rec["dtype"] = dtype
    return rec


@dataclasses.dataclass
class SoupStep:
    """One evaluation of the greedy soup: the candidate soup, its metrics, whether it was kept."""

    added: str
    members: list[str]
    metrics: dict[str, float]
    kept: bool


@dataclasses.dataclass
class SoupResult:
    kind: str  # "greedy" or "uniform"
    objective: Objective
    ingredients: dict[str, dict[str, float]]  # each model alone
    steps: list[SoupStep]
    members: list[str]
    metrics: dict[str, float]
    evaluations: int

    @property
    def best_single(self) -> tuple[str, float]:
        key = self.objective.metric
        pick = max if self.objective.maximize else min
        name = pick(self.ingredients, key=lambda m: self.ingredients[m][key])
        return name, self.ingredients[name][key]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "objective": str(self.objective), "ingredients": self.ingredients,
                "steps": [dataclasses.asdict(s) for s in self.steps], "members": self.members,
                "metrics": self.metrics, "evaluations": self.evaluations,
                "best_single": dict(zip(("model", "value"), self.best_single))}


def _objective(objective: Objective | None, metrics: dict[str, float]) -> Objective:
    """The given objective (checked against the metrics), or the evaluator's only metric."""
    from mergelab.search.pareto import check_metrics, parse_objective

    if objective is None:
        if len(metrics) != 1:
            raise MergeError(f"the evaluator returns several metrics ({', '.join(sorted(metrics))}); choose the one "
                             "that picks the soup as the objective (objective=)", option="objective")
        return parse_objective(next(iter(metrics)))
    check_metrics([objective], metrics)
    return objective


def _check(models: Sequence[str]) -> None:
    if len(models) < 2:
        raise MergeError(f"a soup needs at least two models, got {len(models)}")
    if len(set(map(str, models))) != len(models):
        raise MergeError("a model is listed twice; give each fine-tune once")


def uniform_soup(models: Sequence[str], score: Score, objective: Objective | None, *, dtype: str | None = None,
                 score_ingredients: bool = True) -> SoupResult:
    """Evaluate the uniform soup (and, by default, each ingredient alone for comparison).

    objective None: the evaluator's only metric (directions by name, see pareto.parse_objective).
    """
    _check(models)
    singles = {str(m): score(soup_recipe([m], dtype=dtype), f"model {m}") for m in models} if score_ingredients else {}
    metrics = score(soup_recipe(models, dtype=dtype), "uniform soup")
    objective = _objective(objective, metrics)
    step = SoupStep("(all)", [str(m) for m in models], metrics, True)
    return SoupResult("uniform", objective, singles, [step], [str(m) for m in models], metrics,
                      len(singles) + 1)


def greedy_soup(models: Sequence[str], score: Score, objective: Objective | None, *, dtype: str | None = None,
                progress: Callable[[], None] | None = None) -> SoupResult:
    """Wortsman et al.'s greedy soup (see the module docstring); 2N - 1 evaluations.

    objective None: the evaluator's only metric (directions by name, see pareto.parse_objective).
    """
    _check(models)
    singles: dict[str, dict[str, float]] = {}
    for m in models:
        singles[str(m)] = score(soup_recipe([m], dtype=dtype), f"model {m}")
        objective = _objective(objective, singles[str(m)])
        if progress:
            progress()
    key = objective.metric
    # Best first; the sort is stable, so ties keep the command line's order.
    order = sorted(singles, key=lambda m: singles[m][key], reverse=objective.maximize)
    members = [order[0]]
    current = singles[order[0]]
    steps = [SoupStep(order[0], list(members), current, True)]
    for m in order[1:]:
        trial = score(soup_recipe([*members, m], dtype=dtype), f"soup + {m}")
        kept = objective.better(trial[key], current[key])
        if kept:
            members.append(m)
            current = trial
        steps.append(SoupStep(m, [*members] if kept else [*members, m], trial, kept))
        if progress:
            progress()
    return SoupResult("greedy", objective, singles, steps, members, current, 2 * len(models) - 1)
