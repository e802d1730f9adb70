"""Grid sweeps of recipe fields, several metrics at once, with the Pareto front among them.

Rewarded soups (Rame et al., 2023, arXiv:2306.04488): interpolating between
models fine-tuned on different rewards, theta(w) = (1 - w) theta_1 + w theta_2,
traces a front of trade-offs; sweeping w and keeping the non-dominated points
is that front. Here any recipe field can be swept (`--vary PATH=GRID`), the
grid is the product of the fields' values (or their zip), and every point is
merged in memory and evaluated.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mergelab.errors import MergeError
from mergelab.search.pareto import Objective, check_metrics, pareto_front
from mergelab.search.space import parse_path, set_field

Score = Callable[[dict, str], dict[str, float]]


def parse_grid(text: str) -> list[float]:
    """'0:1:11' -> 11 evenly spaced values from 0 to 1 inclusive; '0.1,0.5,1' -> those values."""
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
            if num < 1:
                raise MergeError(f"grid {text!r}: the number of points must be >= 1")
            return [float(v) for v in np.linspace(start, stop, num)]
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MergeError(f"grid {text!r}: write START:STOP:NUM (e.g. 0:1:11) or comma-separated values") from None
    if not values:
        raise MergeError(f"grid {text!r} is empty")
    return values


def parse_vary(text: str) -> tuple[str, list[float]]:
    """'models[0].parameters.weight=0:1:11' -> (path, values)."""
    path, sep, grid = text.partition("=")
    if not sep or not path.strip():
        raise MergeError(f"vary {text!r}: write FIELD=START:STOP:NUM, e.g. models[0].parameters.weight=0:1:11",
                         option="vary")
    parse_path(path.strip())
    return path.strip(), parse_grid(grid.strip())


def grid_points(varies: Sequence[tuple[str, list[float]]], *, zipped: bool = False) -> list[dict[str, float]]:
    """Points of the sweep: path -> value; the product of the grids, or their zip (equal lengths)."""
    if not varies:
        raise MergeError("nothing to sweep; vary at least one field (FIELD, GRID)", option="vary")
    paths = [p for p, _ in varies]
    if len(set(paths)) != len(paths):
        raise MergeError("a field is varied twice; vary each field once", option="vary")
    grids = [g for _, g in varies]
    if zipped:
        if len({len(g) for g in grids}) != 1:
            raise MergeError(f"zipped=True needs grids of one length, got {[len(g) for g in grids]}", option="zipped")
        combos = list(zip(*grids))
    else:
        combos = list(itertools.product(*grids))
    return [dict(zip(paths, c)) for c in combos]


@dataclasses.dataclass
class SweepResult:
    points: list[dict[str, float]]
    metrics: list[dict[str, float] | None]  # None: the point failed
    errors: list[str | None]
    objectives: list[Objective]
    front: list[int]  # indices of the Pareto-optimal points among those that ran

    def to_dict(self) -> dict[str, Any]:
        return {"objectives": [str(o) for o in self.objectives], "front": self.front,
                "points": [{"values": p, "metrics": m, "error": e, "pareto": i in self.front}
                           for i, (p, m, e) in enumerate(zip(self.points, self.metrics, self.errors))]}


def front_of(metrics: Sequence[Mapping[str, float] | None], objectives: Sequence[Objective]) -> list[int]:
    ok = [i for i, m in enumerate(metrics) if m is not None]
    pts = [[metrics[i][o.metric] for o in objectives] for i in ok]
    return [ok[k] for k in pareto_front(pts, [o.maximize for o in objectives])]


def run_sweep(recipe: Mapping, points: Sequence[Mapping[str, float]], score: Score,
              objectives: Sequence[Objective] | None = None, *, workers: int = 1,
              progress: Callable[[], None] | None = None) -> SweepResult:
    """Evaluate `recipe` at every point; a failing point is recorded (its error) and the sweep goes on.

    objectives: metrics for the Pareto front (None: every metric the evaluator returns,
    directions by name).
    """
    from mergelab.search.pareto import parse_objective

    recipes = []
    for p in points:
        rec = copy.deepcopy(dict(recipe))
        for path, value in p.items():
            set_field(rec, path, value)
        recipes.append(rec)

    failures: dict[int, MergeError] = {}

    def one(i: int) -> tuple[dict | None, str | None]:
        label = ", ".join(f"{k}={v:g}" for k, v in points[i].items())
        try:
            return score(recipes[i], label), None
        except MergeError as exc:
            failures[i] = exc
            return None, str(exc)
        finally:
            if progress:
                progress()

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mergelab-sweep") as pool:
        results = list(pool.map(one, range(len(recipes))))
    metrics = [m for m, _ in results]
    errors = [e for _, e in results]
    done = [m for m in metrics if m is not None]
    if not done:
        raise MergeError(f"every point of the sweep failed; the first: {errors[0]}", option=failures[0].option)
    objs = list(objectives) if objectives else [parse_objective(k) for k in done[0]]
    check_metrics(objs, done[0])
    return SweepResult(list(points), metrics, errors, objs, front_of(metrics, objs))
