"""Smoke test of bench/fusionbench_speed.py: a 2-layer BERT, one method, both tools, both timings written.

Nothing here asserts on speed; it checks the harness: inputs written as HF folders, both subprocesses
succeed and write a model folder, and the JSON and table hold both tools' numbers and their ratio.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fusion_bench")  # the children import it; the parent only needs it installed
pytestmark = pytest.mark.subprocess

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load():
    spec = importlib.util.spec_from_file_location("fusionbench_speed", BENCH / "fusionbench_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fusionbench_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_bert_task_arithmetic_both_tools(tmp_path):
    fbs = _load()
    result = fbs.main(["--size", "tiny", "--methods", "task_arithmetic", "--work-dir", str(tmp_path / "work"),
                       "--results-dir", str(tmp_path / "results")])
    inputs = tmp_path / "work" / "inputs" / "tiny"
    assert all((inputs / n / "config.json").exists() for n in ("base", *fbs.FINETUNES))
    records = result["records"]
    assert sorted(r["tool"] for r in records) == ["fusionbench", "mergelab"]
    for r in records:
        assert r["rc"] == 0, r.get("error")
        assert r["merge_s"] > 0 and r["wall_s"] > r["merge_s"] and r["max_rss_bytes"] > 0
        assert "config.json" in r["wrote"] and any(name.endswith(".safetensors") for name in r["wrote"])
    on_disk = json.loads((tmp_path / "results" / "fusionbench_speed.json").read_text())
    row = on_disk["rows"][0]
    assert row["method"] == "task_arithmetic"
    assert row["ratio_wall_s"] == pytest.approx(row["fusionbench_wall_s"] / row["mergelab_wall_s"])
    md = (tmp_path / "results" / "fusionbench_speed.md").read_text()
    assert "| task_arithmetic |" in md and "failed" not in md
    assert fbs.recipe("ties", fbs.make_inputs(tmp_path / "work" / "inputs", "tiny"))["parameters"]["density"] == 0.2
