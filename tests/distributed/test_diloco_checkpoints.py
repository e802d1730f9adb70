"""Crash recovery: checkpoint-<sync>/ folders of the global model + outer state, read by
`mergelab average` / `mergelab recover`, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import dist_scenarios as sc
from mergelab.cli.main import app
from mergelab.distributed import DiLoCo, latest_checkpoint, simulate_workers

H = 2


def _train(rank, n, run_dir, syncs, *, resume=False, checkpoint_every=None):
    m = sc.mlp()
    X, y = sc.mlp_data(rank)
    inner = torch.optim.SGD(m.parameters(), lr=0.05)  # stateless inner steps: a resumed run is exact
    outer = torch.optim.SGD(m.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    d = DiLoCo(m, inner, outer, sync_every=H, checkpoint_dir=run_dir, checkpoint_every=checkpoint_every)
    if resume:
        d.load_checkpoint(latest_checkpoint(run_dir))
    with d:
        while d.syncs < syncs:
            inner.zero_grad()
            ((m(X) - y) ** 2).mean().backward()
            inner.step()
    return {"params": [p.detach().clone() for p in m.parameters()], "global": d.global_state_dict()}


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = simulate_workers(2, _train, tmp_path / "a", 6)
    simulate_workers(2, _train, tmp_path / "b", 5, checkpoint_every=2)  # "crashes" after sync 5
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    ck = tmp_path / "b" / "checkpoint-4"
    assert {"model.safetensors", "optimizer.pt", "mergelab_diloco.json"} <= {p.name for p in ck.iterdir()}
    assert json.loads((ck / "mergelab_diloco.json").read_text())["syncs"] == 4
    assert "momentum_buffer" in str(torch.load(ck / "optimizer.pt", weights_only=True)["state"][0].keys())
    resumed = simulate_workers(2, _train, tmp_path / "b", 6, resume=True, checkpoint_every=2)
    for r in range(2):
        for a, b in zip(resumed[r]["params"], straight[r]["params"]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # the resumed run saved sync 6: the same global model as the uninterrupted run
    assert (tmp_path / "b" / "checkpoint-6").is_dir()
    sd = load_file(str(tmp_path / "b" / "checkpoint-6" / "model.safetensors"))
    for k, v in straight[0]["global"].items():
        torch.testing.assert_close(sd[k], v, atol=1e-12, rtol=0)


def test_mergelab_average_and_recover_read_the_run(tmp_path):
    run = tmp_path / "run"
    simulate_workers(2, _train, run, 6, checkpoint_every=2)
    out = CliRunner().invoke(app, ["average", str(run), str(tmp_path / "avg"), "--scheme", "sma", "--last", "2"])
    assert out.exit_code == 0, out.output
    avg = load_file(str(tmp_path / "avg" / "model.safetensors"))
    a = load_file(str(run / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(run / "checkpoint-6" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(avg[k], (a[k] + b[k]) / 2, atol=1e-6, rtol=0)
    out = CliRunner().invoke(app, ["recover", str(run), str(tmp_path / "rec"), "--last", "2"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "rec" / "optimizer.pt").read_bytes() == (run / "checkpoint-6" / "optimizer.pt").read_bytes()
