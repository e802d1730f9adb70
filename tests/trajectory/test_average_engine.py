"""`average`/`recover` as one engine pass: numbers against float64 references, every checkpoint read once."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.engine import items as engine_items
from mergelab.checkpoint.reader import Checkpoint
from mergelab.errors import NonFiniteError
from mergelab.trajectory.average import DeviationGram
from mergelab.trajectory.run import average_run, recover_run
from mergelab.trajectory.schedules import scheme_weights

SHAPES = {"a.bias": (5,), "a.weight": (16, 4), "b.weight": (6, 7)}


def _save_run(tmp_path, states):
    run = tmp_path / "run"
    for i, sd in enumerate(states):
        d = run / f"checkpoint-{(i + 1) * 100}"
        d.mkdir(parents=True)
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
        torch.save({"state": {}}, d / "optimizer.pt")
    return run


def _random_run(tmp_path, n=5, dtype=torch.float32, nan=None):
    """n checkpoints drifting from one start; nan=(checkpoint, tensor) puts a NaN there."""
    g = torch.Generator().manual_seed(1)
    theta = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    states = []
    for i in range(n):
        theta = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in theta.items()}
        sd = {k: v.to(dtype) for k, v in theta.items()} | {"count": torch.tensor([i])}
        if nan is not None and nan[0] == i:
            sd[nan[1]].view(-1)[3] = float("nan")
        states.append(sd)
    return _save_run(tmp_path, states), states


class ViewSpy:
    """Counts the elements of each (checkpoint, tensor) handed out by Checkpoint.view, and any full reads."""

    def __init__(self, monkeypatch):
        self.elements: Counter = Counter()
        self.calls: Counter = Counter()
        self.full_reads = 0
        view, getitem = Checkpoint.view, Checkpoint.__getitem__

        def spy_view(ck, name, rows=None):
            t = view(ck, name, rows)
            key = (ck.path.parent.name if ck.path.is_file() else ck.path.name, name)
            self.elements[key] += t.numel()
            self.calls[key] += 1
            return t

        def spy_getitem(ck, name):
            self.full_reads += 1
            return getitem(ck, name)

        monkeypatch.setattr(Checkpoint, "view", spy_view)
        monkeypatch.setattr(Checkpoint, "__getitem__", spy_getitem)

    def checkpoints(self) -> set[str]:
        return {ck for ck, _ in self.elements}


def _float64_average(states, weights, name):
    return sum(w * s[name].to(torch.float64) for s, w in zip(states, weights))


def test_hand_worked_ema_is_exact(tmp_path):
    """EMA alpha 0.5 over three checkpoints: c = (1/4, 1/4, 1/2); [1,2],[3,4],[5,6] -> [3.5, 4.5] exactly."""
    for dtype in (torch.float32, torch.bfloat16):
        states = [{"w": torch.tensor([1.0, 2.0], dtype=dtype)}, {"w": torch.tensor([3.0, 4.0], dtype=dtype)},
                  {"w": torch.tensor([5.0, 6.0], dtype=dtype)}]
        sub = tmp_path / str(dtype).removeprefix("torch.")
        run = _save_run(sub, states)
        average_run(run, sub / "out", scheme="ema", alpha=0.5, show_progress=False)
        got = load_file(str(sub / "out" / "model.safetensors"))["w"]
        assert got.dtype == dtype and got.tolist() == [3.5, 4.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["sma", "wma", "ema", "wsm"])
def test_average_matches_a_float64_weighted_sum(tmp_path, scheme, dtype):
    run, states = _random_run(tmp_path, dtype=dtype)
    average_run(run, tmp_path / "out", scheme=scheme, alpha=0.7, decay="1-sqrt", show_progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    weights = scheme_weights(scheme, len(states), alpha=0.7, decay="1-sqrt")
    for name in SHAPES:
        ref = _float64_average(states, weights, name)
        scale = sum(abs(w) * s[name].to(torch.float64).abs() for s, w in zip(states, weights))
        # float32 accumulation of 5 terms: a few float32 ulps of the sum of magnitudes; bf16: one rounding more.
        tol = 8 * 2.0**-24 * scale + (2.0**-8 * ref.abs() if dtype == torch.bfloat16 else 0)
        assert got[name].dtype == dtype
        assert bool(((got[name].to(torch.float64) - ref).abs() <= tol).all()), name
    assert torch.equal(got["count"], states[-1]["count"])  # non-float: the newest checkpoint's


def test_average_is_bit_identical_to_the_same_linear_merge(tmp_path):
    """`average` is a linear merge with the schedule's weights: the same numbers as `mergelab merge` gives."""
    run, states = _random_run(tmp_path, dtype=torch.bfloat16)
    average_run(run, tmp_path / "avg", scheme="ema", alpha=0.8, show_progress=False)
    weights = scheme_weights("ema", len(states), alpha=0.8)
    recipe = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": str(run / f"checkpoint-{(i + 1) * 100}"), "parameters": {"weight": w}}
                         for i, w in enumerate(weights)]}
    mergelab.merge(recipe, tmp_path / "merged", show_progress=False)
    avg = load_file(str(tmp_path / "avg" / "model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name in SHAPES:
        assert torch.equal(avg[name], merged[name]), name


def test_each_chosen_checkpoint_is_read_once_and_no_other(tmp_path, monkeypatch):
    run, states = _random_run(tmp_path, n=6)
    history = [{"step": s, "loss": 2.0} for s in range(10, 510, 10)] + [{"step": 510, "loss": 50.0}]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))  # spike: 600 is left out
    monkeypatch.setattr(engine_items, "CHUNK_ELEMENTS", 8)  # a.weight (16 x 4) streams in row chunks
    spy = ViewSpy(monkeypatch)
    report = average_run(run, tmp_path / "out", scheme="sma", last=3, skip_unstable=True, show_progress=False)
    assert [u[0] for u in report.used] == [300, 400, 500]
    assert spy.checkpoints() == {"checkpoint-300", "checkpoint-400", "checkpoint-500"}
    for ck in spy.checkpoints():
        for name, shape in SHAPES.items():
            assert spy.elements[(ck, name)] == int(np.prod(shape)), (ck, name)  # every element exactly once
    assert spy.calls[("checkpoint-500", "a.weight")] == 8  # chunked: 16 rows, 2 at a time
    assert spy.full_reads == 0 and report.bytes_reread == 0
    assert report.bytes_read == 3 * sum(int(np.prod(s)) * 4 for s in SHAPES.values()) + 8  # + newest's count
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(got["a.weight"], torch.stack([s["a.weight"] for s in states[2:5]]).mean(0))


def test_deviation_cosines_from_the_same_pass_match_numpy(tmp_path, monkeypatch):
    run, states = _random_run(tmp_path, n=4)
    monkeypatch.setattr(engine_items, "CHUNK_ELEMENTS", 8)
    report = average_run(run, tmp_path / "out", show_progress=False)
    # Independent reference: every float tensor (small: no sampling), deviations from the mean, cosines.
    x = np.stack([np.concatenate([s[k].numpy().astype(np.float64).ravel() for k in SHAPES]) for s in states])
    dev = x - x.mean(0)
    norms = np.linalg.norm(dev, axis=1)
    want = dev @ dev.T / np.outer(norms, norms)
    np.testing.assert_allclose(np.array(report.correlation["deviation_cosine"]), want, rtol=0, atol=1e-12)
    info = json.loads((tmp_path / "out" / "mergelab_average.json").read_text())
    assert info["correlation"]["deviation_cosine"] == report.correlation["deviation_cosine"]


def test_sampled_gram_is_the_same_whole_or_in_chunks():
    """A chunked tensor is sampled at the positions the whole tensor would be (stride on the global grid)."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(37, 11, generator=g) for _ in range(3)]
    whole, chunked = DeviationGram(3, max_elements=50), DeviationGram(3, max_elements=50)
    whole.add(xs)
    for start in range(0, 37, 5):
        chunked.add([x[start:start + 5] for x in xs], start=start * 11, total=37 * 11)
    stride = -(-37 * 11 // 50)
    flat = torch.stack([x.reshape(-1)[::stride].double() for x in xs])
    flat -= flat.mean(0)
    torch.testing.assert_close(whole.gram, flat @ flat.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.gram, whole.gram, rtol=1e-12, atol=1e-12)


def test_nan_checkpoint_stops_the_pass_and_only_its_prefix_is_read_again(tmp_path, monkeypatch):
    run, states = _random_run(tmp_path, n=5, nan=(4, "a.weight"))  # the newest diverged
    spy = ViewSpy(monkeypatch)
    report = recover_run(run, tmp_path / "resume", last=2)
    assert [u[0] for u in report.used] == [300, 400]
    assert [(s, "a.weight" in why) for s, _, why in report.skipped] == [(500, True)]
    # The first pass (400, 500) read the newest's int64 count (the file lists it first), a.bias, then met
    # the NaN in a.weight: those three jobs' inputs were read; the second pass (300, 400) read everything once.
    first_pass = 8 + 2 * (5 + 64) * 4
    assert report.bytes_reread == first_pass
    # the engine's prefetch thread may have mapped the next item (b.weight) in before the NaN stopped the pass
    assert spy.calls[("checkpoint-500", "b.weight")] <= 1 and spy.calls[("checkpoint-500", "a.weight")] == 1
    assert spy.calls[("checkpoint-400", "a.bias")] == 2 and 1 <= spy.calls[("checkpoint-400", "b.weight")] <= 2
    assert all(spy.calls[("checkpoint-300", k)] == 1 for k in SHAPES)
    got = load_file(str(tmp_path / "resume" / "model.safetensors"))
    torch.testing.assert_close(got["a.weight"], (states[2]["a.weight"] + states[3]["a.weight"]) / 2)
    assert (tmp_path / "resume" / "optimizer.pt").exists()


def test_nan_without_skip_unstable_writes_nothing(tmp_path):
    run, _ = _random_run(tmp_path, n=3, nan=(1, "b.weight"))
    with pytest.raises(NonFiniteError, match=r"checkpoint-200.*b\.weight.*skip_unstable=True") as exc:
        average_run(run, tmp_path / "out", show_progress=False)
    assert exc.value.option == "skip_unstable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no temporary left behind


@pytest.mark.parametrize("k", [3, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_gram_matches_the_torch_path(k, dtype):
    """The numba Gram (up to 16 checkpoints) and the torch path agree to float64 rounding; 17 takes the torch path."""
    from mergelab.methods.kernels import kernels_disabled

    g = torch.Generator().manual_seed(k)
    base = torch.randn(300, 70, generator=g)
    xs = [(base + 0.01 * torch.randn(base.shape, generator=g)).to(dtype) for _ in range(k)]
    fast = DeviationGram(k, max_elements=5000)
    fast.add(xs, start=3, total=300 * 70 + 3)
    with kernels_disabled():
        slow = DeviationGram(k, max_elements=5000)
        slow.add(xs, start=3, total=300 * 70 + 3)
    torch.testing.assert_close(fast.gram, slow.gram, rtol=1e-10, atol=0)
    assert bool((fast.gram.diagonal() > 0).all())
