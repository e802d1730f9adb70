"""Shared helpers of the FusionBench parity tests: tiny models, a FusionBench model pool, state-dict checks.

Import from a test module under tests/fusionbench/ as ``from fusionbench.pool import ...`` (tests/ is on
sys.path through its conftest.py; tests/fusionbench is a package so that `pool` cannot clash with another
top-level module). Public API:

    TinyMLP(sizes, norm=True)           Linear layers with biases, a LayerNorm after the first; no buffers
    tiny_models(n, seed, sizes, scale)  -> (base, [fine-tune, ...]): base + seeded Gaussian task vectors
    square_models(n, seed, dim, rank, noise) -> (base, [...]): one (dim, dim) attention-like weight,
                                           task vectors of low rank (+ noise)
    exact_low_rank_models(n, seed, dim, rank) -> (base, [...]): the same with task matrices of rank
                                           exactly ``rank`` (dyadic weights, sums exact in float32)
    digits_tasks(n, seed, steps)        -> (base, [fine-tune, ...], [(x, y), ...]): real SGD on sklearn digits
    fb_pool(base, fts)                  -> fusion_bench BaseModelPool over deep copies ('_pretrained_', 'model_i')
    fb_run(algorithm, pool)             -> state dict of algorithm.run(pool), FusionBench's prints silenced
    fb_trainer(x, batch_size)           -> the few members of a transformers Trainer that FusionBench's generic
                                           fisher_merging / regmean_merging functions call
    WithLogits(model)                   a model whose output has `.logits` (FusionBench's fisher_merging reads it)
    state_dict_of(model)                -> {name: detached float tensor clone}
    max_abs_diff(sd_a, sd_b)            -> {name: max |a - b|}
    assert_same(sd_a, sd_b, atol, rtol) AssertionError naming every tensor that differs (shape, max diff, where)

FusionBench's algorithms modify the modules of a pool in place (task arithmetic adds into `_pretrained_`,
DARE subtracts the base from each fine-tune), so `fb_pool` always hands it deep copies.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from torch import nn

DEFAULT_SIZES = (8, 16, 12, 4)


class TinyMLP(nn.Module):
    """Linear(sizes[0], sizes[1]) -> LayerNorm -> ReLU -> ... -> Linear(sizes[-2], sizes[-1]), biases on.

    State dict keys: ``layers.{k}.weight`` / ``layers.{k}.bias`` for each Linear k, ``norm.weight`` /
    ``norm.bias`` when ``norm``. Every tensor is a parameter (no buffers), as FusionBench's DARE and
    Fisher merges only touch parameters.
    """

    def __init__(self, sizes: Sequence[int] = DEFAULT_SIZES, norm: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norm = nn.LayerNorm(sizes[1]) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k == 0 and self.norm is not None:
                x = self.norm(x)
            if k < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class WithLogits(nn.Module):
    """Wraps a model so that its output is an object with ``.logits``; state dict keys gain ``net.``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.net(x))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturbed(base: nn.Module, seed: int, scale: float) -> nn.Module:
    """A deep copy of ``base`` with N(0, scale^2 * mean|w|^2)-ish noise added to every tensor."""
    ft = copy.deepcopy(base)
    g = _generator(seed)
    with torch.no_grad():
        for p in ft.parameters():
            size = float(p.abs().mean()) or 1.0
            p.add_(torch.randn(p.shape, generator=g) * (scale * size))
    return ft


def tiny_models(n: int = 3, seed: int = 0, sizes: Sequence[int] = DEFAULT_SIZES,
                scale: float = 0.1, norm: bool = True) -> tuple[nn.Module, list[nn.Module]]:
    """A seeded TinyMLP base and ``n`` fine-tunes = base + seeded Gaussian task vectors.

    The same (n, seed, sizes, scale) always give the same float32 tensors.
    """
    state = torch.random.get_rng_state()  # nn.Linear initialises from the global generator: restore it
    try:
        torch.manual_seed(seed)
        base = TinyMLP(sizes, norm=norm)
    finally:
        torch.random.set_rng_state(state)
    return base, [_perturbed(base, 1000 * seed + 1 + i, scale) for i in range(n)]


class _Square(nn.Module):
    """One (dim, dim) weight and a bias, like an attention projection."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def square_models(n: int = 3, seed: int = 0, dim: int = 24, rank: int = 6, scale: float = 0.1,
                  noise: float = 1e-2) -> tuple[nn.Module, list[nn.Module]]:
    """A base with one (dim, dim) Linear ``proj`` and ``n`` fine-tunes whose weight task vectors have rank
    ``rank`` plus a little full-rank noise (``noise`` of it; 0 leaves them of rank ``rank`` up to float32
    rounding), so their spectra decay like real fine-tunes'."""
    g = _generator(seed)
    base = _Square(dim)
    with torch.no_grad():
        base.proj.weight.copy_(torch.randn(dim, dim, generator=g) / dim ** 0.5)
        base.proj.bias.copy_(torch.randn(dim, generator=g) * 0.1)
    fts = []
    for _ in range(n):
        ft = copy.deepcopy(base)
        low = torch.randn(dim, rank, generator=g) @ torch.randn(rank, dim, generator=g) / dim
        full = torch.randn(dim, dim, generator=g) / dim
        with torch.no_grad():
            ft.proj.weight.add_(scale * (low + noise * full))
            ft.proj.bias.add_(scale * torch.randn(dim, generator=g))
        fts.append(ft)
    return base, fts


def exact_low_rank_models(n: int = 3, seed: int = 0, dim: int = 12, rank: int = 2) -> tuple[nn.Module, list[nn.Module]]:
    """Like square_models, but every weight is a multiple of 1/8 and each task matrix a product of such
    (dim, rank) @ (rank, dim) factors / 4: every sum is exact in float32, so theta_i - theta_base has rank
    ``rank`` exactly (its other singular values are 0 in float32 and float64 alike); biases are zero."""
    g = _generator(seed)

    def dyadic(*shape):
        return torch.randint(-4, 5, shape, generator=g).float() / 8

    base = _Square(dim)
    with torch.no_grad():
        base.proj.weight.copy_(dyadic(dim, dim))
        base.proj.bias.zero_()
    fts = []
    for _ in range(n):
        ft = copy.deepcopy(base)
        with torch.no_grad():
            ft.proj.weight.add_(dyadic(dim, rank) @ dyadic(rank, dim) / 4)
        fts.append(ft)
    return base, fts


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    x = x[:, x.std(0) > 0.05]  # pixels (nearly) always blank would make every Gram matrix singular
    return (x - x.mean(0)) / x.std(0), torch.tensor(d.target, dtype=torch.long)


def digits_tasks(n: int = 2, seed: int = 0, steps: int = 30, examples: int = 64, hidden: int = 16,
                 lr: float = 0.1) -> tuple[nn.Module, list[nn.Module], list[tuple[torch.Tensor, torch.Tensor]]]:
    """A TinyMLP (features -> hidden -> 10) base and ``n`` fine-tunes, each from ``steps`` full-batch SGD steps on
    its own task: digits of the classes {2i, 2i+1, ...} (task i's share of the ten classes, disjoint).

    Returns (base, fine-tunes, [(x_i, y_i)]) with ``examples`` inputs and labels per task; the inputs are
    the standardised pixels of the 8x8 images that are not (nearly) always blank.
    Deterministic for a seed; about 0.1 s on one core.
    """
    x, y = _digits()
    base, _ = tiny_models(0, seed, sizes=(x.shape[1], hidden, 10))
    fts, data = [], []
    classes = torch.arange(10)
    for i in range(n):
        mine = classes[i::n]
        idx = torch.nonzero(torch.isin(y, mine)).flatten()
        idx = idx[torch.randperm(len(idx), generator=_generator(seed + i))[:examples]]
        xi, yi = x[idx], y[idx]
        ft = copy.deepcopy(base)
        opt = torch.optim.SGD(ft.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(ft(xi), yi).backward()
            opt.step()
        for p in ft.parameters():
            p.grad = None
        fts.append(ft)
        data.append((xi, yi))
    return base, fts, data


def fb_pool(base: nn.Module | None, fts: Sequence[nn.Module]):
    """A FusionBench BaseModelPool of deep copies: '_pretrained_' (when base is given), 'model_0', ...

    BaseModelPool accepts a dict of already-built modules (OmegaConf cannot hold them, so it keeps the
    dict as is) and `load_model` returns them without copying; hence the deep copies here.
    """
    from fusion_bench import BaseModelPool

    models: dict[str, nn.Module] = {}
    if base is not None:
        models["_pretrained_"] = copy.deepcopy(base)
    for i, ft in enumerate(fts):
        models[f"model_{i}"] = copy.deepcopy(ft)
    return BaseModelPool(models)


def fb_run(algorithm, pool) -> dict[str, torch.Tensor]:
    """``algorithm.run(pool)`` with FusionBench's prints and profiler tables silenced; the merged state dict."""
    import contextlib
    import io
    import logging

    logging.getLogger("fusion_bench").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        merged = algorithm.run(pool)
    return state_dict_of(merged)


def fb_trainer(x: torch.Tensor, batch_size: int) -> SimpleNamespace:
    """What FusionBench's generic `fisher_merging` / `regmean_merging` use of a transformers Trainer:
    get_train_dataloader() (batches {'x': inputs}, in order), _train_batch_size, _prepare_inputs."""
    batches = [{"x": x[k:k + batch_size]} for k in range(0, len(x), batch_size)]
    return SimpleNamespace(get_train_dataloader=lambda: batches, _train_batch_size=batch_size,
                           _prepare_inputs=lambda inputs: inputs)


def state_dict_of(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: detached clone} of a module's state dict (or of a mapping of tensors)."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().clone() for k, v in sd.items()}


def max_abs_diff(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """{name: max |a - b|} over the names both hold (float64 differences)."""
    return {k: float((sd_a[k].double() - sd_b[k].double()).abs().max()) if sd_a[k].numel() else 0.0
            for k in sd_a if k in sd_b}


def assert_same(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor], atol: float = 0.0,
                rtol: float = 0.0, what: str = "") -> float:
    """Assert two state dicts hold the same names, shapes and values within |a - b| <= atol + rtol |b|.

    atol = rtol = 0 asks for bit-identical tensors. The message names every tensor that differs, with
    its shape, the max abs difference, how many entries fail and the first failing index. Returns the
    largest abs difference over all tensors (for reports).
    """
    sd_a, sd_b = state_dict_of(sd_a), state_dict_of(sd_b)
    prefix = f"{what}: " if what else ""
    if set(sd_a) != set(sd_b):
        raise AssertionError(f"{prefix}different tensors: only in a {sorted(set(sd_a) - set(sd_b))}, "
                             f"only in b {sorted(set(sd_b) - set(sd_a))}")
    problems, worst = [], 0.0
    for name in sorted(sd_a):
        a, b = sd_a[name], sd_b[name]
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        diff = (a.double() - b.double()).abs()
        if diff.numel() == 0:
            continue
        worst = max(worst, float(diff.max()))
        bad = diff > atol + rtol * b.double().abs()
        if bool(bad.any()):
            first = tuple(int(i) for i in torch.nonzero(bad)[0])
            problems.append(f"{name} {tuple(a.shape)}: max |a - b| = {float(diff.max()):.3g}, "
                            f"{int(bad.sum())}/{bad.numel()} entries beyond atol={atol:g} rtol={rtol:g}, "
                            f"first at {first}: a={float(a[first]):.9g} b={float(b[first]):.9g}")
    if problems:
        raise AssertionError(prefix + "state dicts differ:\n  " + "\n  ".join(problems))
    return worst
