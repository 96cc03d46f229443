"""backend="torch" and backend="reference" (the package's materialised oracle, kernels/naive.py) against the
tests' own brute-force oracle (tests/oracle_check.py, no shared code), docs/definitions.md section 7."""
import pytest
import torch

import rhythm
from rhythm_kernels.layer_attention import LayerAttention
from rhythm_kernels.segments import influence_counts, segments_from_mask
from rhythm_kernels.torch_blocked import blocked_attention_metrics, query_block_size
from tests.oracle_check import LARGE_WINDOWS, assert_matches_oracle, large_window_case, random_qkv

BACKENDS = ["torch", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 2, 97, 255])
@pytest.mark.parametrize("q_heads,kv_heads", [(3, 3), (6, 2), (9, 1)])
def test_lengths_and_gqa(backend, length, q_heads, kv_heads):
    q, k, v = random_qkv(2, q_heads, kv_heads, length, 16, with_v=True, seed=length)
    metrics = rhythm.attention_metrics(q, k, v, backend=backend)
    assert_matches_oracle(metrics, q, k, v)


@pytest.mark.parametrize("horizon", [(10, 100), (0, 5), (10, None), (0, 0), (3, None)])
@pytest.mark.parametrize("window", [1, 10, 64])
def test_horizons_and_windows(horizon, window):
    q, k, _ = random_qkv(1, 4, 2, 200, 32, seed=window)
    metrics = rhythm.attention_metrics(q, k, window=window, horizon=horizon, backend="torch",
                                       response_start=37)
    assert_matches_oracle(metrics, q, k, window=window, horizon=horizon, response_start=37)


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("horizon", [(10, 100), (0, 5), (10, None), (40, 45)])
def test_small_blocks_cross_every_band_edge(block, horizon):
    """Blocks smaller than W and than the horizon band: the band helpers must split correctly."""
    q, k, v = random_qkv(2, 3, 1, 157, 16, seed=block, with_v=True)
    mask = torch.ones(2, 157, dtype=torch.bool)
    mask[0, :11] = False
    mask[1, 140:] = False
    resp = torch.tensor([60, 3])
    segments = segments_from_mask(mask, 2, 157, resp, q.device)
    counts = influence_counts(segments, 2, 157, horizon)
    got = blocked_attention_metrics(q, k, v, segments, counts, window=64, horizon=horizon, scale=0.25,
                                    block=block)
    assert_matches_oracle(got, q, k, v, window=64, horizon=horizon, scale=0.25, attention_mask=mask,
                          response_start=resp)


def test_padding_both_sides_and_response_starts():
    q, k, v = random_qkv(3, 6, 3, 120, 16, with_v=True, seed=7)
    mask = torch.zeros(3, 120, dtype=torch.long)
    mask[0, 20:] = 1          # left padding
    mask[1, :95] = 1          # right padding
    mask[2, 5:111] = 1        # both
    resp = torch.tensor([60, 94, 111])   # the last row's response is empty (response_start = end)
    metrics = rhythm.attention_metrics(q, k, v, attention_mask=mask, response_start=resp, backend="torch")
    assert_matches_oracle(metrics, q, k, v, attention_mask=mask, response_start=resp)
    real = mask.bool()[:, None, :].expand_as(metrics.lse)
    for name in ("lse", "distance", "waad", "fai"):
        assert torch.all(getattr(metrics, name)[~real] == 0), f"{name} not 0 on padding"
    assert not metrics.fai_valid[~real].any()
    assert not metrics.fai_valid[2].any(), "an empty response leaves no valid FAI"
    assert torch.all(metrics.out[~mask.bool()] == 0)


def test_packed_varlen():
    q, k, v = random_qkv(1, 4, 2, 240, 16, with_v=True, seed=11)
    cu = torch.tensor([0, 1, 50, 177, 240])
    resp = torch.tensor([0, 30, 177, 200])
    metrics = rhythm.attention_metrics(q, k, v, cu_seqlens=cu, response_start=resp, horizon=(10, None),
                                       backend="torch")
    assert_matches_oracle(metrics, q, k, v, cu_seqlens=cu, response_start=resp, horizon=(10, None))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    q, k, v = random_qkv(2, 6, 2, 150, 64, dtype=dtype, with_v=True, seed=13)
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1, :30] = False
    metrics = rhythm.attention_metrics(q, k, v, attention_mask=mask, response_start=torch.tensor([40, 70]),
                                       backend="torch")
    assert metrics.out.dtype == dtype and metrics.waad.dtype == torch.float32
    assert_matches_oracle(metrics, q, k, v, attention_mask=mask, response_start=torch.tensor([40, 70]))


def test_head_dim_128_and_custom_scale():
    q, k, v = random_qkv(1, 2, 1, 64, 128, with_v=True, seed=17, spread=1.0)
    metrics = rhythm.attention_metrics(q, k, v, scale=0.3, backend="torch")
    assert_matches_oracle(metrics, q, k, v, scale=0.3)


@pytest.mark.parametrize("seed,spread", [(19, 1.5), (0, 0.3), (3, 0.3)])
def test_unclamped_invariants(seed, spread):
    """The section 7 invariants the backend does not enforce by construction: 0 <= distance <= t and
    0 <= fai <= 1. (waad is clamped to [0, min(W, distance)] against rounding and fai is set to 0 where
    invalid, so asserting those ranges could not fail; their accuracy tests are what checks them.)"""
    q, k, _ = random_qkv(2, 6, 3, 255, 32, seed=seed, spread=spread)
    for window in (1, 10, 64):
        m = rhythm.attention_metrics(q, k, window=window, response_start=100, backend="torch")
        tol = 1e-5
        assert torch.all(m.fai >= 0) and torch.all(m.fai <= 1 + tol)
        positions = torch.arange(255, dtype=torch.float32)
        assert torch.all(m.distance >= 0) and torch.all(m.distance <= positions + tol)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="GPU-only meaning: torch's CPU kernels are deterministic, so on CPU this cannot fail")
def test_deterministic_bitwise():
    q, k, v = random_qkv(1, 9, 3, 255, 64, with_v=True, seed=23, device="cuda")
    first = rhythm.attention_metrics(q, k, v, backend="torch", response_start=50)
    second = rhythm.attention_metrics(q, k, v, backend="torch", response_start=50)
    for name in ("lse", "distance", "waad", "fai", "out"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_distance_exact_at_long_range():
    """Local attention at the end of a long sequence: distance is small (about 3) while t is 16K. A
    t-minus-mean formulation loses it to fp32 cancellation; the blocked sum must not."""
    length, dim, lag = 16384, 64, 3
    gen = torch.Generator().manual_seed(29)
    q = torch.randn(1, 1, length, dim, generator=gen) * 3
    k = torch.roll(q, shifts=-lag, dims=2)      # k_s = q_{s+lag}: row t attends to key t - lag
    m = rhythm.attention_metrics(q, k, backend="torch", validate=False)
    # Exact fp64 reference for the last rows only (the full oracle would need 2 GiB per map).
    rows = torch.arange(length - 64, length)
    scores = (q[0, 0, rows].double() @ k[0, 0].double().T) * dim ** -0.5
    lags = rows[:, None] - torch.arange(length)[None, :]
    attn = torch.softmax(scores.masked_fill(lags < 0, float("-inf")), dim=-1)
    want = (attn * lags.clamp_min(0)).sum(-1)
    got = m.distance[0, 0, rows].double()
    assert torch.all((got - want).abs() <= 1e-4 * want.clamp_min(1))
    assert want.max() < 2 * lag  # the case really is local attention far from the start


def test_block_size_respects_budget():
    assert query_block_size(9, 4096) * 9 * 4096 <= 1 << 22
    assert query_block_size(1, 10) == 256
    assert query_block_size(64, 1 << 20) == 16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,sliding_window", LARGE_WINDOWS)
def test_large_windows(backend, window, sliding_window):
    """WAAD within 1e-4 for every W (no W - band / l cancellation); W >= every lag is exactly the distance."""
    q, k, mask = large_window_case()
    layer = LayerAttention(sliding_window=sliding_window)
    metrics = rhythm.attention_metrics(q, k, window=window, attention_mask=mask, backend=backend, layer=layer)
    assert_matches_oracle(metrics, q, k, window=window, attention_mask=mask, layer=layer)
    if window >= 512:
        assert torch.equal(metrics.waad, metrics.distance)
