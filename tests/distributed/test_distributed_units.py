"""Bad arguments, quantizers and buckets of mergelab.distributed (no process group needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergelab.distributed import SPARTA, DiLoCo, simulate_workers
from mergelab.distributed.buckets import dequantize, make_buckets, quantize, quantized_nbytes
from mergelab.errors import MergeError


def _model():
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))


@pytest.mark.parametrize("kw, match", [
    (dict(sync_every=0), "sync_every must be an integer >= 1, got 0"),
    (dict(sync_every=2.5), "got 2.5"),
    (dict(sync_every=3, model_fragments="two"), "multiple of the number of fragments"),
    (dict(sync_every=4, fragment_sync_delay=2, model_fragments="two"), r"\[0, sync_every / fragments = 2\), got 2"),
    (dict(sync_every=4, fragment_update_alpha=1.5), "got 1.5"),
    (dict(sync_every=4, quantize="int3"), "got 'int3'"),
    (dict(sync_every=4, checkpoint_every=0), "checkpoint_every must be an integer >= 1, got 0"),
])
def test_bad_schedule_is_a_value_error(kw, match):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    if kw.get("model_fragments") == "two":
        kw["model_fragments"] = [m[0], m[1]]
    with pytest.raises(ValueError, match=match):
        simulate_workers(1, lambda r, n: DiLoCo(m, opt, opt, **kw))


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_bad_fraction_is_a_value_error(fraction):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fraction must be in \\(0, 1\\]"):
        simulate_workers(1, lambda r, n: SPARTA(m, opt, fraction=fraction))


def test_unknown_outer_merge_or_parameter_is_reported():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(MergeError, match="not a mergelab method"):
        simulate_workers(2, lambda r, n: DiLoCo(m, opt, opt, 2, outer_merge="tiez"))
    with pytest.raises(MergeError, match="densty"):
        simulate_workers(2, lambda r, n: DiLoCo(m, opt, opt, 2, outer_merge="ties", merge_params={"densty": 0.5}))


def test_fragments_must_cover_the_model_once():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="1.weight is in no fragment"):
        simulate_workers(1, lambda r, n: DiLoCo(m, opt, opt, 2, model_fragments=[m[0]]))


@pytest.mark.parametrize("kind, bound", [("bf16", 2**-7), ("fp8", 2**-3), ("int4", 1 / 14)])
def test_quantizers_round_trip_within_their_step(kind, bound):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 1000)
    buf = quantize(x, kind)
    assert buf.dtype == torch.uint8 and buf.numel() == quantized_nbytes(1000, kind)
    y = dequantize(buf, kind, 1000)
    if kind == "int4":
        # symmetric absmax with 7 levels per sign: error at most half a step, absmax / 14, per block of 64
        amax = torch.nn.functional.pad(x.abs(), (0, 24)).view(-1, 64).amax(1).repeat_interleave(64)[:1000]
        assert bool(((x - y).abs() <= amax * bound + 1e-7).all())
    else:  # relative rounding of a float format (fp8 e4m3: 3 mantissa bits; bf16: 7)
        assert bool(((x - y).abs() <= x.abs() * bound / 2 + 1e-12).all())
    assert quantized_nbytes(1000, "int4") == 16 * 32 + 16 * 4  # 0.5 byte/value + a float32 scale per 64


def test_buckets_keep_order_and_split_by_dtype_and_size():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(10, dtype=torch.float64), torch.zeros(100), torch.zeros(1)]
    assert make_buckets(ts, cap_bytes=100) == [[0, 1], [2], [3], [4]]
