"""magmax and wudi against fusion-bench 0.2.33's MagMaxAlgorithm and WUDIMerging on tiny models."""

from __future__ import annotations

import pytest

import mergelab
from fusionbench.pool import assert_same, fb_pool, fb_run, square_models, tiny_models

fb_method = pytest.importorskip("fusion_bench.method", reason="fusion-bench 0.2.33 is the reference")
from fusion_bench.method.wudi.wudi import WUDIMerging  # noqa: E402


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_magmax_is_fusionbench_bit_for_bit(scale):
    base, fts = tiny_models(3, seed=0)
    fb = fb_run(fb_method.MagMaxAlgorithm(scaling_factor=scale), fb_pool(base, fts))
    ours = mergelab.merge_state_dicts("magmax", fts, base=base, **{"lambda": scale})
    assert_same(ours, fb, what="magmax")


@pytest.mark.parametrize("models", ["mlp", "square"])
def test_wudi_equals_fusionbench_to_float32_rounding(models):
    base, fts = tiny_models(3, seed=1) if models == "mlp" else square_models(3, seed=2)
    algorithm = WUDIMerging(iter_num=20)
    algorithm.fabric = type("Fabric", (), {"device": "cpu", "_loggers": None})()  # what its Fabric mixin reads
    fb = fb_run(algorithm, fb_pool(base, fts))
    ours = mergelab.merge_state_dicts("wudi", fts, base=base, iterations=20)
    assert_same(ours, fb, atol=1e-6, rtol=1e-5, what="wudi")
