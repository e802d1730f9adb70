"""examples/fusion_suite.py in its fast mode: the digits suite's accuracy-vs-tasks harness, real properties."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import mergelab
from mergelab.demos import suite

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fusion_suite.py"


def _load():
    spec = importlib.util.spec_from_file_location("fusion_suite_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fusion_suite_example"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion_suite")
    return out, _load().run(True, [0], out, log=lambda _: None)


def test_files_and_fields(fast):
    out, result = fast
    on_disk = json.loads((out / "fusion_suite.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(result["summary"]))
    assert {"config", "seeds", "sizes", "tasks", "methods", "summary", "errors", "records"} <= set(on_disk)
    assert (out / "fusion_suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "fusion_suite.md").read_text()
    assert "| individual |" in md and "norm. acc, 2 tasks" in md


def test_one_pair_one_seed_and_every_registered_candidate(fast):
    _, result = fast
    assert result["sizes"] == [2] and [r["tasks"] for r in result["records"]] == [["rotate", "mirror"]]
    registered = {m for _, m, _ in suite.CANDIDATES} & set(mergelab.methods())
    assert {m for m, _ in result["methods"].values()} == registered
    assert {"task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "fisher", "regmean"} <= registered
    ran = set(result["summary"]) - {"individual"}
    assert ran | set(result["errors"]) == set(result["methods"])  # every method either ran or says why not
    assert "regmean_plusplus" in ran  # its Grams taken on the merged earlier layers of the Sequential MLP


def test_individual_beats_every_merge_and_normalised_is_the_ratio(fast):
    _, result = fast
    rec = result["records"][0]
    ind = rec["merges"]["individual"]
    for label, r in rec["merges"].items():
        if label == "individual" or "error" in r:
            continue
        assert r["average"] <= ind["average"] + 1e-9, label
        want = sum(r["accuracy"][t] / ind["accuracy"][t] for t in rec["tasks"]) / len(rec["tasks"])
        assert r["normalized"] == pytest.approx(want)
        assert 0.0 <= r["normalized"] <= 1.05
    # the base's accuracy on rotated/mirrored digits is far below the fine-tunes': merging keeps something
    assert max(r["normalized"] for k, r in rec["merges"].items() if k != "individual" and "error" not in r) > 0.4


def test_aggregate_hand_case():
    recs = [{"seed": s, "tasks": ["a", "b"], "merges": {"m": {"average": a, "normalized": a}}}
            for s, a in [(0, 0.5), (0, 0.7), (1, 0.8)]]
    row = suite.aggregate(recs)["m"]["2"]
    # seed 0's mean over its two subsets is 0.6, seed 1's 0.8: mean 0.7, sample std 0.1414
    assert row["normalized"] == pytest.approx(0.7) and row["normalized_std"] == pytest.approx(2 ** 0.5 / 10)
    assert row["seeds"] == 2 and suite.subsets(["a", "b", "c"], [2, 3]) == [("a", "b"), ("a", "c"), ("b", "c"),
                                                                             ("a", "b", "c")]
