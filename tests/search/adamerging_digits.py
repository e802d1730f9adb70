"""A tiny digits suite for the AdaMerging tests: a base MLP and task fine-tunes, trained in seconds."""

from __future__ import annotations

import functools

import torch

from mergelab.demos.digits import load_digits_split, make_mlp, single_thread, task_inputs, train

TASK_NAMES = ("rotate", "mirror", "shift")


@functools.lru_cache(maxsize=1)
def digits_suite(hidden: int = 32, seed: int = 0):
    """(base, [fine-tunes], {task: [unlabelled test batches]}, {task: (x_test, y_test)})."""
    data = load_digits_split(seed)
    with single_thread():
        torch.manual_seed(seed)
        base = make_mlp(hidden)
        train(base, torch.optim.Adam(base.parameters(), lr=1e-2), data["x_train"], data["y_train"], 150, 64, seed)
        models, batches, tests = [], {}, {}
        for k, name in enumerate(TASK_NAMES):
            model = make_mlp(hidden)
            model.load_state_dict(base.state_dict())
            x = task_inputs(name, data["x_train"], seed)
            train(model, torch.optim.Adam(model.parameters(), lr=1e-2), x, data["y_train"], 150, 64, seed + k + 1)
            models.append(model)
            xt = task_inputs(name, data["x_test"], seed)
            batches[name] = list(xt.split(64))
            tests[name] = (xt, data["y_test"])
    return base, models, batches, tests


def mlp32():
    """The suite's architecture, for `--model file.py:mlp32`."""
    return make_mlp(32)
