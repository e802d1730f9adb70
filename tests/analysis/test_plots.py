"""Each plot writes a PNG of the expected size, from results computed here."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch
from torch import nn

from mergelab.analysis.inspect import inspect_models
from mergelab.analysis.paths import interpolation_path, plane, scaling_curve
from mergelab.analysis.plots import plot_layer_similarity, plot_path, plot_plane, plot_scaling_curve
from mergelab.errors import MergeError


class Vector(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))


def bowl(model):
    t = model.theta.detach()
    return {"loss": float(t.square().sum()), "accuracy": float(1 / (1 + t.square().sum()))}


def sd(*v):
    return {"theta": torch.tensor(v, dtype=torch.float64)}


def check_png(path, width, height=None):
    """A PNG of `width` pixels (and `height`, when given) with something drawn on it; returns its pixels."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[1] == width and (height is None or image.shape[0] == height)  # inches x 120 dpi
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas
    return image


def test_all_plots_write_pngs(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(6, 4, generator=g) for i in range(3)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    report = inspect_models(models, base)
    assert [g.name for g in report.groups] == ["layer 0", "layer 1", "layer 2"]
    small = check_png(plot_layer_similarity(report, tmp_path / "sim.png"), 720)
    # one heat-map row per pair of models: four models (six pairs) give a taller figure than three
    four = inspect_models([{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(4)], base)
    tall = check_png(plot_layer_similarity(four, tmp_path / "sim4.png"), 720)
    assert tall.shape[0] > small.shape[0]
    check_png(plot_path(interpolation_path(Vector(), sd(-1, 0), sd(1, 1), bowl, points=5), tmp_path / "p.png"),
              720, 480)
    curve = scaling_curve(Vector(), sd(0, 0), [sd(1, 1)], bowl, [0.0, 0.5])
    check_png(plot_scaling_curve(curve, tmp_path / "nested" / "s.png"), 720, 480)
    result = plane(Vector(), sd(0, 0), sd(1, 0), sd(0, 1), bowl, grid=4, extra={"m": sd(0.5, 0.5)})
    check_png(plot_plane(result, tmp_path / "plane.png"), 720, 600)
    with pytest.raises(MergeError, match="'nope' was not evaluated"):
        plot_plane(result, tmp_path / "bad.png", metric="nope")


@pytest.mark.parametrize("sign, warm", [(1.0, True), (-1.0, False)])
def test_heat_map_colour_follows_the_cosine(tmp_path, sign, warm):
    """Task vectors tau_b = +tau_a (cosine 1) draw the map red, tau_b = -tau_a (cosine -1) blue (RdBu_r)."""
    g = torch.Generator().manual_seed(1)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(6, 4, generator=g) for i in range(4)}
    tau = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    a = {k: base[k] + tau[k] for k in base}
    b = {k: base[k] + sign * tau[k] for k in base}
    report = inspect_models([a, b], base)
    assert all(gr.task_cosine[0][1] == pytest.approx(sign, abs=1e-6) for gr in report.groups)
    image = check_png(plot_layer_similarity(report, tmp_path / "map.png"), 720)
    h, w = image.shape[:2]
    centre = image[int(0.4 * h):int(0.5 * h), int(0.3 * w):int(0.5 * w), :3].reshape(-1, 3).mean(0)
    red, blue = float(centre[0]), float(centre[2])
    assert (red > blue + 0.15) if warm else (blue > red + 0.15), centre  # dark red (0.40, 0, 0.12) at +1
