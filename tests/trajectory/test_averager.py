"""WeightAverager against torch.optim.swa_utils.AveragedModel on the same weight sequence."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mergelab.trajectory.averager import WeightAverager, refresh_batchnorm


def _sequence(n=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    states = []
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, states


def _run(avg, ref, model, states):
    for s in states:
        model.load_state_dict(s)
        avg.update(model)
        ref.update_parameters(model)


def test_swa_matches_averaged_model():
    model, states = _sequence()
    avg = WeightAverager(model, "swa")
    ref = AveragedModel(model)
    _run(avg, ref, model, states)
    for a, r in zip(avg.averaged(), ref.module.parameters()):
        torch.testing.assert_close(a, r)


def test_ema_matches_averaged_model():
    model, states = _sequence()
    avg = WeightAverager(model, "ema", decay=0.8)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    _run(avg, ref, model, states)
    for a, r in zip(avg.averaged(), ref.module.parameters()):
        torch.testing.assert_close(a, r)


def test_lawa_is_the_mean_of_the_last_window():
    model, states = _sequence(6)
    avg = WeightAverager(model, "lawa", window=3)
    for s in states:
        model.load_state_dict(s)
        avg.update(model)
    names = [n for n, _ in model.named_parameters()]
    for name, a in zip(names, avg.averaged()):
        torch.testing.assert_close(a, torch.stack([s[name] for s in states[-3:]]).mean(0))


def test_state_dict_round_trip_and_copy_to():
    model, states = _sequence()
    avg = WeightAverager(model, "ema", decay=0.5, warmup=True)
    for s in states[:3]:
        model.load_state_dict(s)
        avg.update(model)
    again = WeightAverager(model, "ema", decay=0.5, warmup=True)
    again.load_state_dict(avg.state_dict())
    for s in states[3:]:
        model.load_state_dict(s)
        avg.update(model)
        again.update(model)
    target = _sequence(1)[0]
    again.copy_to(target)
    for a, p in zip(avg.averaged(), target.parameters()):
        torch.testing.assert_close(a, p.detach())


def test_warmup_decay_ramps():
    model, _ = _sequence(1)
    avg = WeightAverager(model, "ema", decay=0.999, warmup=True)
    assert avg.current_decay() == pytest.approx(0.1)
    avg.num_updates = 10_000
    assert avg.current_decay() == pytest.approx(0.999)


def test_refresh_batchnorm_recomputes_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = [torch.randn(16, 3) + 2.0 for _ in range(4)]
    refresh_batchnorm(model, data)
    with torch.no_grad():
        feats = model[0](torch.cat(data))
    torch.testing.assert_close(model[1].running_mean, feats.mean(0), rtol=1e-4, atol=1e-5)


def test_bad_input():
    model, _ = _sequence(1)
    with pytest.raises(ValueError, match="scheme"):
        WeightAverager(model, "median")
    with pytest.raises(RuntimeError, match="update"):
        WeightAverager(model, "ema").averaged()
