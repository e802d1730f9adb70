"""Objectives (a metric and its direction) and the Pareto front of several of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from mergelab.errors import MergeError

# Metrics where higher is better unless the user says otherwise (`metric:min`).
_MAXIMIZED_MARKERS = ("acc", "f1", "score", "reward", "bleu", "rouge", "exact", "cos", "sim")


@dataclasses.dataclass(frozen=True)
class Objective:
    """A metric of the evaluator's result and whether higher is better."""

    metric: str
    maximize: bool

    def __str__(self) -> str:
        return f"{self.metric}:{'max' if self.maximize else 'min'}"

    def better(self, a: float, b: float) -> bool:
        """a strictly better than b."""
        return a > b if self.maximize else a < b


def default_maximize(metric: str) -> bool:
    """Accuracy-like names (accuracy, f1, score, reward, ...) are maximised; everything else is a loss."""
    low = metric.lower()
    return any(m in low for m in _MAXIMIZED_MARKERS)


def parse_objective(text: str) -> Objective:
    """'accuracy' -> maximise (by name), 'loss' -> minimise, 'x:max' / 'x:min' explicit."""
    name, sep, direction = text.rpartition(":")
    if not sep:
        return Objective(text, default_maximize(text))
    if direction not in ("max", "min") or not name:
        raise MergeError(f"objective {text!r}: write METRIC, METRIC:max or METRIC:min")
    return Objective(name, direction == "max")


def check_metrics(objectives: Sequence[Objective], metrics: Mapping[str, float]) -> None:
    missing = [o.metric for o in objectives if o.metric not in metrics]
    if missing:
        raise MergeError(f"objective metric {missing[0]!r} is not among the evaluator's metrics "
                         f"({', '.join(sorted(metrics))}); name one of those")


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """a is at least as good as b in every objective and strictly better in one."""
    signs = [1.0 if m else -1.0 for m in maximize]
    ge = all(s * x >= s * y for s, x, y in zip(signs, a, b))
    gt = any(s * x > s * y for s, x, y in zip(signs, a, b))
    return ge and gt


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Indices of the non-dominated points (Pareto-optimal), in input order.

    A point is on the front when no other point is at least as good in every
    objective and strictly better in one (duplicates of a front point are all kept).
    Sorting by the first objective and sweeping keeps the 2-objective case
    O(n log n); more objectives fall back to the pairwise check.
    """
    n = len(points)
    if n == 0:
        return []
    if len(maximize) != 2:
        return [i for i in range(n) if not any(dominates(points[j], points[i], maximize) for j in range(n) if j != i)]
    s = [1.0 if m else -1.0 for m in maximize]
    # Best first in objective 0, ties broken by best in objective 1: a point is on the front
    # when its objective 1 beats every point before it, or equals the best one with the same objective 0.
    order = sorted(range(n), key=lambda i: (-s[0] * points[i][0], -s[1] * points[i][1]))
    front, best1, best_pair = [], float("-inf"), None
    for i in order:
        y0, y1 = s[0] * points[i][0], s[1] * points[i][1]
        if y1 > best1 or (best_pair is not None and (y0, y1) == best_pair):
            front.append(i)
            if y1 > best1:
                best1, best_pair = y1, (y0, y1)
    return sorted(front)
