"""`--json` on merge and methods, and a command line that starts without importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

import mergelab
from mergelab.cli import catalog
from mergelab.cli.main import app


def _recipe(tmp_path, p) -> str:
    path = tmp_path / "r.yml"
    path.write_text(f"merge_method: slerp\nbase_model: {p['a']}\nparameters: {{t: 0.5}}\nmodels:\n"
                    f"  - model: {p['a']}\n  - model: {p['b']}\n    parameters: {{weight: 0.7}}\n")
    return str(path)


def test_merge_json_is_the_only_thing_on_stdout(llama_family, tmp_path):
    result = CliRunner().invoke(app, ["merge", _recipe(tmp_path, llama_family), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the whole of stdout parses: no progress bar, no prose
    written = json.loads((tmp_path / "out" / "mergelab_report.json").read_text())
    assert summary == {"out_dir": str(tmp_path / "out"), **written}
    assert summary["method"] == "slerp" and summary["tensors"] == summary["merged"] > 0
    assert summary["ignored_parameters"] == ["models[1].parameters.weight: slerp has no parameter weight; "
                                             "ignored (as MergeKit does)"]


def test_merge_json_dry_run_describes_the_plan(llama_family, tmp_path):
    result = CliRunner().invoke(app, ["merge", _recipe(tmp_path, llama_family), str(tmp_path / "out"),
                                      "--json", "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dry_run"] and plan["method"] == "slerp" and not (tmp_path / "out").exists()
    names = {j["tensor"] for j in plan["tensors"]}
    assert "model.layers.0.mlp.up_proj.weight" in names and all(j["inputs"] == 2 for j in plan["tensors"])


def test_methods_json_matches_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == mergelab.methods()
    one = CliRunner().invoke(app, ["methods", "ties", "--json"])
    assert json.loads(one.stdout) == mergelab.methods()["ties"]
    bad = CliRunner().invoke(app, ["methods", "tis"])
    assert bad.exit_code == 2 and "unknown merge method 'tis' (did you mean 'ties'" in bad.output


def test_catalog_is_rebuilt_when_a_method_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    first = catalog.catalog_path()
    catalog.method_catalog()
    assert first.is_file()
    # a stale catalog (other sources) sits under another name and is never read
    monkeypatch.setattr(catalog, "fingerprint", lambda: "0" * 20)
    assert catalog.catalog_path() != first
    stale = catalog.catalog_path()
    stale.write_text(json.dumps({"bogus": {"parameters": {}}}))
    assert "bogus" in catalog.method_catalog()  # what the file under the current name says is what is read
    stale.write_text("{not json")
    assert catalog.method_catalog() == mergelab.methods()  # unreadable: rebuilt from the registry


def test_help_and_methods_start_without_importing_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    catalog.method_catalog()  # what a first run leaves in the cache
    # One fresh interpreter runs the four commands in turn; torch must not be loaded at the end.
    code = ("import sys, time\n"
            "from mergelab.cli.main import app\n"
            "for args in (['--help'], ['methods'], ['methods', 'ties'], ['merge', '--help']):\n"
            "    sys.argv = ['mergelab', *args]\n"
            "    try:\n        app()\n    except SystemExit as exc:\n        assert not exc.code, (args, exc.code)\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("NO-TORCH"), proc.stderr
    assert "Merge neural networks" in proc.stdout and "ties: parameters" in proc.stdout and "--offline" in proc.stdout
