"""Greedy and uniform soups on toy models with a known evaluator; sweeps; the Pareto front."""

from __future__ import annotations

import random

import pytest

from mergelab.analysis.eval_setup import function_setup
from mergelab.errors import MergeError
from mergelab.search.candidate import CandidateEvaluator
from mergelab.search.pareto import Objective, pareto_front, parse_objective
from mergelab.search.soup import greedy_soup, uniform_soup
from mergelab.search.sweep import grid_points, parse_grid, parse_vary, run_sweep

from search_toys import linear_recipe, toy_spec, unit_models, write_vectors  # noqa: F401 (a fixture)

# score = -|w|^2. Worked by hand:
#   alone: D -0.82, A -1, B -1.01, C -4  -> order D, A, B, C
#   {D}+A = (0.95, 0.05): -0.905 < -0.82 rejected
#   {D}+B = (-0.05, 0.1): -0.0125        kept
#   {D,B}+C = (-0.1/3, 2.2/3): -0.5389   rejected       -> greedy soup {D, B}, -0.0125
#   uniform (A,B,C,D) = (0.225, 0.55): -0.353125
VECTORS = {"A": (1.0, 0.0), "B": (-1.0, 0.1), "C": (0.0, 2.0), "D": (0.9, 0.1)}


@pytest.fixture
def soup_models(tmp_path):
    return write_vectors(tmp_path, VECTORS)


def _scorer(first, fn: str, workers: int = 1) -> CandidateEvaluator:
    return CandidateEvaluator.from_setup(function_setup(toy_spec(fn), first), workers=workers)


def test_greedy_soup_picks_the_hand_worked_set(soup_models):
    paths = [str(soup_models[k]) for k in "ABCD"]
    score = _scorer(paths[0], "neg_dist")
    r = greedy_soup(paths, score, Objective("score", True))
    assert r.members == [str(soup_models["D"]), str(soup_models["B"])]
    assert [s.added for s in r.steps] == [str(soup_models[k]) for k in "DABC"]
    assert [s.kept for s in r.steps] == [True, False, True, False]
    assert [s.metrics["score"] for s in r.steps] == pytest.approx([-0.82, -0.905, -0.0125, -(1 / 900 + 4.84 / 9)])
    assert r.metrics["score"] == pytest.approx(-0.0125)
    assert r.best_single == (str(soup_models["D"]), pytest.approx(-0.82))
    assert r.evaluations == 7
    u = uniform_soup(paths, score, Objective("score", True))
    assert u.metrics["score"] == pytest.approx(-(0.225 ** 2 + 0.55 ** 2))


def test_greedy_soup_minimising_a_loss_keeps_improving_models(tmp_path):
    # loss = (x - 0.3)^2 + 2 (y - 0.7)^2: P=(0.3, 0.7) is the optimum, so nothing averaged with it helps.
    m = write_vectors(tmp_path, {"P": (0.3, 0.7), "Q": (0.5, 0.9), "R": (0.1, 0.5)})
    paths = [str(m[k]) for k in "PQR"]
    r = greedy_soup(paths, _scorer(paths[0], "quadratic"), Objective("loss", False))
    # {P}+Q = (0.4, 0.8): 0.03 > 0 rejected; {P}+R = (0.2, 0.6): 0.03 rejected.
    assert r.members == [str(m["P"])]
    assert r.metrics["loss"] == pytest.approx(0.0, abs=1e-12)


def test_the_objective_defaults_to_the_evaluators_only_metric(soup_models):
    paths = [str(soup_models[k]) for k in "ABCD"]
    r = greedy_soup(paths, _scorer(paths[0], "neg_dist"), None)  # "score": maximised by its name
    assert r.objective == Objective("score", True)
    assert r.members == [str(soup_models["D"]), str(soup_models["B"])]
    with pytest.raises(MergeError, match=r"several metrics \(x_score, y_score\); choose.*objective=") as exc:
        greedy_soup(paths, _scorer(paths[0], "coords"), None)
    assert exc.value.option == "objective"
    with pytest.raises(MergeError, match="'acc' is not among"):
        uniform_soup(paths, _scorer(paths[0], "neg_dist"), Objective("acc", True))


def test_a_soup_needs_two_distinct_models(soup_models):
    p = str(soup_models["A"])
    with pytest.raises(MergeError, match="at least two"):
        greedy_soup([p], _scorer(p, "neg_dist"), Objective("score", True))
    with pytest.raises(MergeError, match="twice"):
        greedy_soup([p, p], _scorer(p, "neg_dist"), Objective("score", True))


def _brute_front(points, maximize):
    signs = [1 if m else -1 for m in maximize]
    out = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            if j == i:
                continue
            if all(s * a >= s * b for s, a, b in zip(signs, q, p)) and any(s * a > s * b for s, a, b in zip(signs, q, p)):
                dominated = True
        if not dominated:
            out.append(i)
    return out


@pytest.mark.parametrize("maximize", [(True, True), (True, False), (False, False), (True, False, True)])
def test_pareto_front_matches_brute_force(maximize):
    rng = random.Random(len(maximize) * 10 + sum(maximize))
    for _ in range(60):
        n = rng.randint(1, 25)
        # Values on a coarse grid make ties and duplicates common.
        pts = [[rng.randint(0, 5) / 5 for _ in maximize] for _ in range(n)]
        assert pareto_front(pts, list(maximize)) == _brute_front(pts, maximize)


def test_objectives_and_grids_parse():
    assert parse_objective("accuracy") == Objective("accuracy", True)
    assert parse_objective("loss") == Objective("loss", False)
    assert parse_objective("loss:max") == Objective("loss", True)
    with pytest.raises(MergeError, match="METRIC:max"):
        parse_objective("loss:up")
    assert parse_grid("0:1:5") == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert parse_grid("0.1, 0.5") == [0.1, 0.5]
    assert parse_vary("models[0].parameters.weight=0:1:3") == ("models[0].parameters.weight", [0, 0.5, 1])
    with pytest.raises(MergeError, match="FIELD=") as exc:
        parse_vary("models[0].parameters.weight")
    assert exc.value.option == "vary"
    assert len(grid_points([("a", [1, 2]), ("b", [3, 4, 5])])) == 6
    with pytest.raises(MergeError, match="zipped=True needs grids of one length") as exc:
        grid_points([("a", [1, 2]), ("b", [3, 4, 5])], zipped=True)
    assert exc.value.option == "zipped"


def test_sweep_marks_the_front_of_two_metrics(unit_models):
    score = _scorer(unit_models["e1"], "coords", workers=2)
    recipe = linear_recipe(unit_models, 0.0, 0.0)
    points = grid_points([("models[0].parameters.weight", [0.0, 0.5, 1.0]),
                          ("models[1].parameters.weight", [0.0, 0.5, 1.0])])
    r = run_sweep(recipe, points, score, workers=2)
    # The merge is (w1, w2) exactly: each point's metrics are its own coordinates.
    for p, m in zip(r.points, r.metrics):
        assert (m["x_score"], m["y_score"]) == pytest.approx(tuple(p.values()))
    # Both maximised: only (1, 1) is undominated.
    assert [r.points[i] for i in r.front] == [{"models[0].parameters.weight": 1.0, "models[1].parameters.weight": 1.0}]
    # Zipped (w, 1 - w): a trade-off, every point is on the front (rewarded soups' line).
    zipped = grid_points([("models[0].parameters.weight", [0.0, 0.5, 1.0]),
                          ("models[1].parameters.weight", [1.0, 0.5, 0.0])], zipped=True)
    assert run_sweep(recipe, zipped, score).front == [0, 1, 2]


def test_a_failing_sweep_point_is_recorded_and_the_sweep_goes_on(unit_models):
    score = _scorer(unit_models["e1"], "flaky")
    recipe = linear_recipe(unit_models, 0.0, 0.5)
    r = run_sweep(recipe, grid_points([("models[0].parameters.weight", [0.5, 1.0])]), score)
    assert r.metrics[1] is None and "evaluation crashed" in r.errors[1] and "flaky" in r.errors[1]
    assert r.metrics[0]["loss"] == pytest.approx(0.04 + 2 * 0.04)
    assert r.front == [0]
