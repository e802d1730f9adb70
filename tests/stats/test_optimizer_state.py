"""Optimizer metrics: real optimizers stepped, saved and reloaded, checked against their raw state."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mergelab.errors import StatsError
from mergelab.stats import detect_kind, extract_optimizer_metrics, load_trainer_checkpoint, metric_from_state


class Net(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


def train(model, opt, steps=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        opt.step()


def saved(opt, tmp_path):
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    return torch.load(tmp_path / "optimizer.pt", weights_only=True)


def reference(kind, opt, p):
    """The metric from the live optimizer, found by parameter object (not by index), as each optimizer computes it."""
    state, group = opt.state[p], next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    if kind == "adam":
        v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        bias_correction2 = 1 - group["betas"][1] ** float(state["step"])
        return v.sqrt() / math.sqrt(bias_correction2) + group["eps"]
    if kind == "adagrad":
        return state["sum"].sqrt() + group["eps"]
    if kind == "rmsprop":
        v = state["square_avg"]
        if group["centered"]:
            v = v - state["grad_avg"] ** 2
        return v.sqrt() + group["eps"]
    return torch.ones_like(p)


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95)),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6),
    "amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    "centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, centered=True),
}
KIND = {"adamw": "adam", "amsgrad": "adam", "momentum": "sgd", "centered": "rmsprop"}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_round_trip_through_torch_save(name, tmp_path):
    model = Net()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt)
    kind = KIND.get(name, name)
    state = saved(opt, tmp_path)
    assert detect_kind(state) == kind
    metrics = extract_optimizer_metrics(model, state)
    assert metrics.kind == "optimizer" and metrics.extra["optimizer"] == kind
    assert list(metrics) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert_close(metrics[n], reference(kind, opt, p), rtol=1e-5, atol=1e-9)
    # Names alone are enough when the state has tensors of every parameter's shape.
    if kind != "sgd" or name == "momentum":
        by_name = extract_optimizer_metrics([n for n, _ in model.named_parameters()], state)
        for n in metrics:
            assert_close(by_name[n], metrics[n])
    scaled = extract_optimizer_metrics(model, state, divide_by_lr=True)
    assert_close(scaled["fc.weight"], metrics["fc.weight"] / 1e-2)


def test_groups_of_the_hugging_face_trainer(tmp_path):
    """Trainer puts weight-decayed parameters in group 0, biases and norms in group 1: not named order."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, num_labels=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if "bias" in n or "LayerNorm" in n]
    decay = [p for n, p in named if not ("bias" in n or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3)
    ids = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        opt.step()
    folder = tmp_path / "checkpoint-2"
    model.save_pretrained(folder)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    ckpt = load_trainer_checkpoint(folder)
    assert ckpt.model is not None and next(ckpt.model.parameters()).device.type == "meta"
    metrics = ckpt.optimizer_metrics()
    for n, p in named:
        assert_close(metrics[n], reference("adam", opt, p), rtol=1e-5, atol=1e-9)
    # With names only, two layouts fit the group sizes and nothing says which: refuse to guess.
    with pytest.raises(StatsError, match="ambiguous"):
        extract_optimizer_metrics([n for n, _ in named], ckpt.optimizer_state)


def test_optimizer_that_recorded_parameter_names(tmp_path):
    model = Net()
    opt = torch.optim.Adam(list(model.named_parameters())[::-1], lr=1e-2)  # any order: the names say
    train(model, opt)
    metrics = extract_optimizer_metrics(model, saved(opt, tmp_path))
    for n, p in model.named_parameters():
        assert_close(metrics[n], reference("adam", opt, p))


def test_bad_inputs(tmp_path):
    model = Net()
    frozen_head = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.head.requires_grad_(False)
    train(model, frozen_head)
    model.head.requires_grad_(True)
    with pytest.raises(StatsError, match="2 parameters have no adam state.*head.weight"):
        extract_optimizer_metrics(model, saved(frozen_head, tmp_path))
    with pytest.raises(StatsError, match="holds 6 parameters but the model has 4"):
        extract_optimizer_metrics(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)),
                                  saved(frozen_head, tmp_path))
    other = Net()
    other.fc = torch.nn.Linear(4, 3, bias=False)
    other.extra = torch.nn.Parameter(torch.ones(5))
    with pytest.raises(StatsError, match="does not fit the model"):
        extract_optimizer_metrics(other, saved(frozen_head, tmp_path))
    never_stepped = torch.optim.Adam(model.parameters())
    with pytest.raises(StatsError, match="cannot tell the optimizer"):
        extract_optimizer_metrics(model, saved(never_stepped, tmp_path))
    with pytest.raises(StatsError, match="not supported"):
        extract_optimizer_metrics(model, saved(frozen_head, tmp_path), kind="lion")
    with pytest.raises(StatsError, match="no optimizer.pt"):
        load_trainer_checkpoint(tmp_path / "nowhere")
    with pytest.raises(StatsError, match="shape must be given"):
        metric_from_state("sgd", {}, {"lr": 0.1})
    with pytest.raises(StatsError, match="step 0"):
        metric_from_state("adam", {"step": torch.tensor(0.0), "exp_avg_sq": torch.ones(2)}, {})
