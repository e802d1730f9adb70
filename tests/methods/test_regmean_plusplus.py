"""regmean_plusplus: RegMean's arithmetic on Grams taken with the merged earlier blocks (stats/gram_sequential)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import mergelab
from mergelab.stats import gram_matrices, save_stats
from mergelab.stats.gram_sequential import regmean_plusplus_stats

ALPHA = 0.5


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, h):
        return torch.tanh(self.fc(h))


class Tiny(nn.Module):
    """embed (a linear outside the blocks: averaged) -> 2 blocks tanh(W h + b) -> LayerNorm."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(3, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(4)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


def _setup():
    models = [Tiny(1), Tiny(2)]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(10, 3, generator=g) * (i + 1) for i in range(2)]
    return models, xs, [[x[:6], x[6:]] for x in xs]


def _by_hand_regmean(ws, grams, alpha):
    """(sum G~_i)^-1 sum G~_i W_i^T in float64 with a plain solve: the second formula."""
    gt = [alpha * g.double() + (1 - alpha) * torch.diag(torch.diag(g.double())) for g in grams]
    a = sum(gt)
    b = sum(g @ w.double().T for g, w in zip(gt, ws))
    return torch.linalg.solve(a, b).T.float()


def test_two_blocks_by_hand_and_plusplus_differs_from_regmean():
    models, xs, data = _setup()
    res = regmean_plusplus_stats(models, data, alpha=ALPHA)
    sd = res.state_dict
    avg = {k: (models[0].state_dict()[k] + models[1].state_dict()[k]) / 2 for k in sd}
    for k in ("embed.weight", "embed.bias", "layers.0.fc.bias", "layers.1.fc.bias", "norm.weight", "norm.bias"):
        torch.testing.assert_close(sd[k], avg[k])
    e = [x @ avg["embed.weight"].T + avg["embed.bias"] for x in xs]  # merged embedding feeds block 0
    g0 = [h.T @ h / h.shape[0] for h in e]
    w0 = _by_hand_regmean([m.layers[0].fc.weight.detach() for m in models], g0, ALPHA)
    torch.testing.assert_close(sd["layers.0.fc.weight"], w0, rtol=1e-5, atol=1e-6)
    h1 = [torch.tanh(h @ w0.T + avg["layers.0.fc.bias"]) for h in e]  # the merged block 0 feeds block 1
    g1 = [h.T @ h / h.shape[0] for h in h1]
    w1 = _by_hand_regmean([m.layers[1].fc.weight.detach() for m in models], g1, ALPHA)
    torch.testing.assert_close(sd["layers.1.fc.weight"], w1, rtol=1e-5, atol=1e-6)
    for i in range(2):
        torch.testing.assert_close(res.stats[i]["layers.1.fc.weight"], g1[i], rtol=1e-5, atol=1e-6)
    plain = mergelab.merge_state_dicts("regmean", models, stats=[gram_matrices(m, d) for m, d in zip(models, data)],
                                       alpha=ALPHA)
    assert (plain["layers.1.fc.weight"] - sd["layers.1.fc.weight"]).abs().max() > 1e-3
    assert set(res.stats[0]) == {"layers.0.fc.weight", "layers.1.fc.weight"}
    assert res.stats[0].extra["merged_upstream"] is True and res.stats[0].count == 10


def test_without_merged_upstream_the_grams_are_plain_regmeans():
    models, _, data = _setup()
    res = regmean_plusplus_stats(models, data, alpha=ALPHA, merged_upstream=False)
    for m, d, st in zip(models, data, res.stats):
        plain = gram_matrices(m, d)
        for k in ("layers.0.fc.weight", "layers.1.fc.weight"):
            torch.testing.assert_close(st[k], plain[k], rtol=1e-6, atol=1e-7)
    want = mergelab.merge_state_dicts("regmean", models, stats=res.stats, alpha=ALPHA)
    for k, v in want.items():
        torch.testing.assert_close(res.state_dict[k], v)


def test_weights_and_the_recipe_route_reproduce_the_direct_merge(tmp_path):
    models, _, data = _setup()
    res = regmean_plusplus_stats(models, data, weights=[1.0, 3.0], alpha=ALPHA)
    entries = []
    for i, (m, st) in enumerate(zip(models, res.stats)):
        (tmp_path / f"m{i}").mkdir()
        save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()},
                  str(tmp_path / f"m{i}" / "model.safetensors"))
        save_stats(tmp_path / f"s{i}.safetensors", st)
        entries.append({"model": str(tmp_path / f"m{i}"), "stats": str(tmp_path / f"s{i}.safetensors"),
                        "parameters": {"weight": [1.0, 3.0][i]}})
    recipe = {"merge_method": "regmean_plusplus", "models": entries, "parameters": {"alpha": ALPHA}}
    mergelab.merge(recipe, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(res.state_dict)
    for k, v in res.state_dict.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)
    avg = (models[0].norm.weight + 3 * models[1].norm.weight).detach() / 4
    torch.testing.assert_close(got["norm.weight"], avg)


def test_the_method_is_regmeans_arithmetic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g)
    a = torch.randn(2, 5, 4, generator=g)
    grams = a.transpose(1, 2) @ a
    want = mergelab.merge_tensors("regmean", list(x), stats=list(grams), alpha=0.3, weight=[1.0, 2.0])
    got = mergelab.merge_tensors("regmean_plusplus", list(x), stats=list(grams), alpha=0.3, weight=[1.0, 2.0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    spec = mergelab.methods()["regmean_plusplus"]
    assert spec["needs_stats"] and "arXiv:2508.03121" in spec["doc"]


def _tilde(g: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    return alpha * g + (1 - alpha) * torch.diag(torch.diag(g))


def _regmean(grams: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """W = ((sum G~_i)^-1 sum G~_i W_i^T)^T at the method's default alpha (0.1)."""
    gt = [_tilde(g) for g in grams]
    return torch.linalg.solve(sum(gt), sum(g @ w.T for g, w in zip(gt, weights))).T


def test_a_plain_sequential_mlp_is_merged_layer_by_layer_from_the_merged_activations():
    """No ModuleList: the nn.Sequential's children are the blocks (activations have nothing to merge);
    layer 2's Grams are those of relu(merged layer 0 (x)), worked out here by hand."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    models = []
    for _ in range(2):
        m = copy.deepcopy(base)
        for p in m.parameters():
            p.data += 0.1 * torch.randn_like(p)
        models.append(m)
    data = [[torch.randn(32, 8) for _ in range(3)] for _ in models]
    result = regmean_plusplus_stats(models, data)
    merged = result.state_dict
    assert sorted(merged) == sorted(base.state_dict())
    assert [sorted(s) for s in result.stats] == [["0.weight", "2.weight", "4.weight"]] * 2
    xs = [torch.cat(d) for d in data]
    w0 = _regmean([x.T @ x for x in xs], [m[0].weight.data for m in models])
    torch.testing.assert_close(merged["0.weight"], w0, atol=1e-6, rtol=1e-5)
    hs = [torch.relu(x @ merged["0.weight"].T + merged["0.bias"]) for x in xs]
    w2 = _regmean([h.T @ h for h in hs], [m[2].weight.data for m in models])
    torch.testing.assert_close(merged["2.weight"], w2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged["0.bias"], (models[0][0].bias + models[1][0].bias) / 2)


def test_one_dataset_per_model_is_required():
    models, _, data = _setup()
    with pytest.raises(mergelab.errors.StatsError, match="one dataset per model"):
        regmean_plusplus_stats(models, data[:1])


def test_cli_on_tiny_llamas_then_the_recipe_gives_the_direct_merge(tmp_path):
    """`mergelab stats gram-plusplus` on HF folders (blocks model.layers, padding left out), then a recipe."""
    from typer.testing import CliRunner

    from conftest import write_llama_family
    from mergelab.cli.main import app
    from mergelab.stats.gram_sequential import gram_plusplus_for
    from test_cli_analyze import save_word_tokenizer

    paths = write_llama_family(tmp_path, names=("a", "b"), scale=0.2, num_hidden_layers=2)
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(("a", "b")):
        save_word_tokenizer(paths[name])
        lines = [" ".join(f"w{int(t)}" for t in torch.randint(i * 40, i * 40 + 50, (3 + k % 5,), generator=g))
                 for k in range(6)]
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    args = ["stats", "gram-plusplus", str(paths["a"]), str(paths["b"]), "--alpha", "0.9", "--batch-size", "4"]
    for name in ("a", "b"):
        args += ["--data", str(tmp_path / f"{name}.txt"), "--out", str(tmp_path / f"{name}.pp.safetensors")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    recipe = {"merge_method": "regmean_plusplus", "parameters": {"alpha": 0.9},
              "models": [{"model": str(paths[n]), "stats": str(tmp_path / f"{n}.pp.safetensors")} for n in "ab"]}
    mergelab.merge(recipe, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = gram_plusplus_for([paths["a"], paths["b"]], [tmp_path / "a.txt", tmp_path / "b.txt"], alpha=0.9,
                             batch_size=4)
    assert "model.layers.1.mlp.down_proj.weight" in want.stats[0]
    for k, v in want.state_dict.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
