"""The Triton backend at the edges of fp32: big logits, a scale that underflows, any window W, horizons of
2**31 - 1 ("to the end"). Every case against the fp64 oracle at docs/definitions.md section 7 (under the
interpreter without CUDA; tests/conftest.py sets TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RHYTHM_TRITON_AUTOTUNE", "0")

from tests.oracle_check import assert_matches_oracle, random_qkv  # noqa: E402

import rhythm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(q, k, v=None, **kwargs):
    return rhythm.attention_metrics(q, k, v, backend="triton", **kwargs)


def test_big_logits_fai():
    """Scores of a few hundred (q, k scaled by sqrt(300)): A must not inherit the rounding of a large fp32 lse.
    (Recomputing A as 2^(S2 - log2(e) * lse) with lse ~ 1500 in fp32 put fai 1.7e-4 relative off.)"""
    q, k, _ = random_qkv(1, 2, 1, 128, 64, device=DEVICE, seed=0, spread=300 ** 0.5)
    metrics = run(q, k, horizon=(10, None))
    assert_matches_oracle(metrics, q, k, horizon=(10, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-46, 1e-300])
def test_scale_that_underflows_fp32(dtype, scale):
    """scale * log2(e) rounds to 0 in fp32: the logits are all 0 (uniform attention), never -inf * 0 = NaN."""
    q, k, _ = random_qkv(1, 2, 1, 70, 32, dtype=dtype, device=DEVICE, seed=3)
    metrics = run(q, k, scale=scale, response_start=5)
    assert_matches_oracle(metrics, q, k, scale=scale, response_start=5)
    t = torch.arange(70, dtype=torch.float64)
    assert torch.allclose(metrics.distance[0, 0].double().cpu(), t / 2, atol=1e-4)   # uniform: mean lag t / 2


@pytest.mark.parametrize("window,sliding_window", [(300, None), (1000, None), (10 ** 9, None), (10 ** 9, 100)])
def test_large_windows(window, sliding_window):
    """WAAD for any W (T = 512) within the section 7 bound: no W - band / l cancellation (that form was off by
    3e-4 at W = 1000, 2e-2 at 1e5, 209 at 1e9). A W at least the segment length is plain distance, bitwise.
    (waad then takes distance's values, here up to ~250, where fp32 rounding of the scores and sums alone is
    ~7e-5: the absolute 1e-4 holds with little margin for values in the hundreds, as in the torch backend.)
    With a sliding window of 100 as well, waad is the windowed distance."""
    q, k, _ = random_qkv(1, 1, 1, 512, 32, device=DEVICE, seed=5, spread=1.0)
    kwargs = dict(window=window, horizon=(0, 0), layer=rhythm.LayerAttention(sliding_window=sliding_window))
    metrics = run(q, k, **kwargs)
    assert_matches_oracle(metrics, q, k, **kwargs)
    if window >= 512:
        assert torch.equal(metrics.waad, metrics.distance)


@pytest.mark.parametrize("horizon", [(10, 2 ** 31 - 1), (2 ** 31 - 1, 2 ** 31 - 1)])
def test_horizon_int32_max(horizon):
    """2**31 - 1 for "to the end": n0 + BLOCK_N + H_hi must not wrap around in int32."""
    cu = torch.tensor([0, 50, 130], device=DEVICE)
    q, k, _ = random_qkv(1, 2, 1, 130, 32, device=DEVICE, seed=4)
    metrics = run(q, k, cu_seqlens=cu, horizon=horizon)
    assert_matches_oracle(metrics, q, k, cu_seqlens=cu, horizon=horizon)
    assert bool(metrics.fai_valid.any()) == (horizon[0] < 130)
