"""Per-layer attention mechanisms (sliding window, chunks, softcap, sinks): the torch and reference backends
against a per-element computation written here from the definitions (no code shared with the kernels), and
the checks of ``rhythm.LayerAttention``."""
import math

import numpy as np
import pytest
import torch

import rhythm
from rhythm import LayerAttention
from rhythm_kernels.segments import influence_counts, segments_from_cu_seqlens, segments_from_mask
from rhythm_kernels.torch_blocked import blocked_attention_metrics
from tests.oracle_check import assert_matches_oracle, assert_within_spec7, random_qkv


def brute_force(q, k, spans, *, window, horizon, scale, sliding_window=None, chunk_size=None, softcap=None,
                sinks=None):
    """Per-element definitions in Python floats. spans: (batch row, start, end, response_start) per sequence.

    Returns lse, distance, waad, fai as nested lists [B][Hq][T] (0 on padding)."""
    batch, heads, length, _ = q.shape
    group = heads // k.shape[1]
    h_lo, h_hi = horizon
    out = {name: [[[0.0] * length for _ in range(heads)] for _ in range(batch)]
           for name in ("lse", "distance", "waad", "fai")}
    for b, start, end, resp in spans:
        for h in range(heads):
            qh, kh = q[b, h].double(), k[b, h // group].double()
            attn = {}
            for t in range(start, end):
                keys = [s for s in range(start, t + 1)
                        if (sliding_window is None or t - s < sliding_window)
                        and (chunk_size is None or (t - start) // chunk_size == (s - start) // chunk_size)]
                logits = {}
                for s in keys:
                    x = scale * float(torch.dot(qh[t], kh[s]))
                    logits[s] = x if softcap is None else softcap * math.tanh(x / softcap)
                denominator = sum(math.exp(x) for x in logits.values())
                if sinks is not None:
                    denominator += math.exp(float(sinks[h]))
                for s, x in logits.items():
                    attn[t, s] = math.exp(x) / denominator
                out["lse"][b][h][t] = math.log(denominator)
                out["distance"][b][h][t] = sum(attn[t, s] * (t - s) for s in keys)
                out["waad"][b][h][t] = sum(attn[t, s] * min(t - s, window) for s in keys)
            for s in range(start, end):
                last = end - 1 if h_hi is None else min(end - 1, s + h_hi)
                rows = [t for t in range(s + h_lo, last + 1) if t >= resp]
                if rows:
                    out["fai"][b][h][s] = sum(attn.get((t, s), 0.0) for t in rows) / len(rows)
    return out


def assert_spec_close(got, want, names=("lse", "distance", "waad", "fai")):
    """docs/definitions.md section 7 fp32 bounds (through the tests' one helper)."""
    for name in names:
        assert_within_spec7(name, got[name], torch.tensor(want[name], dtype=torch.float64))


MECHANISMS = {
    "window": dict(sliding_window=5),
    "window_1": dict(sliding_window=1),
    "chunk": dict(chunk_size=7),
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=[0.5, -1.0, 3.0, 1.5]),
    "window_chunk": dict(sliding_window=6, chunk_size=9),
    "all": dict(sliding_window=8, chunk_size=11, softcap=3.0, sinks=[2.0, 0.0, -2.0, 4.0]),
}
HEADS, KV_HEADS, LENGTH, DIM = 4, 2, 40, 8


def _layout(kind):
    """(mask, cu_seqlens, response_start, host spans) for a batch of LENGTH positions."""
    if kind == "padded":
        mask = torch.zeros(2, LENGTH, dtype=torch.long)
        mask[0, 6:] = 1              # left padding
        mask[1, 2:33] = 1            # both sides
        resp = torch.tensor([20, 12])
        return mask, None, resp, [(0, 6, LENGTH, 20), (1, 2, 33, 12)]
    cu = torch.tensor([0, 13, 14, LENGTH])    # packed, with a one-token segment
    resp = torch.tensor([4, 13, 30])
    return None, cu, resp, [(0, 0, 13, 4), (0, 13, 14, 13), (0, 14, LENGTH, 30)]


def _segments(mask, cu, resp, batch):
    if cu is not None:
        return segments_from_cu_seqlens(cu, batch, LENGTH, resp, torch.device("cpu"))
    return segments_from_mask(mask, batch, LENGTH, resp, torch.device("cpu"))


@pytest.mark.parametrize("horizon", [(2, 6), (0, None)])          # (2, 6): H_hi cuts the band
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_backends_match_per_element_definitions(mechanism, layout, horizon):
    spec = dict(MECHANISMS[mechanism])
    mask, cu, resp, spans = _layout(layout)
    batch = 2 if layout == "padded" else 1
    q, k, _ = random_qkv(batch, HEADS, KV_HEADS, LENGTH, DIM, seed=len(mechanism), spread=1.3)
    if "sinks" in spec:
        spec["sinks"] = torch.tensor(spec["sinks"])
    layer = LayerAttention(**spec)
    window, scale = 4, DIM ** -0.5
    want = brute_force(q, k, spans, window=window, horizon=horizon, scale=scale, **spec)
    kwargs = dict(window=window, horizon=horizon, attention_mask=mask, cu_seqlens=cu, response_start=resp,
                  layer=layer)
    for backend in ("torch", "reference", "triton"):       # triton: the interpreter without CUDA
        metrics = rhythm.attention_metrics(q, k, backend=backend, **kwargs)
        assert_spec_close(vars(metrics), want)
    # Blocks of 16 rows: the window / chunk edges and the horizon band cross block boundaries.
    segments = _segments(mask, cu, resp, batch)
    counts = influence_counts(segments, batch, LENGTH, horizon)
    blocked = blocked_attention_metrics(q, k, None, segments, counts, window=window, horizon=horizon,
                                        scale=scale, block=16, layer=layer)
    assert_spec_close(blocked, want)


@pytest.mark.parametrize("spec,block,window", [(dict(sliding_window=48), 32, 10), (dict(chunk_size=100), None, 70),
                                               (dict(chunk_size=64), 16, 10),
                                               (dict(sliding_window=90, chunk_size=150, softcap=5.0), 16, 80)])
def test_torch_matches_oracle_longer(spec, block, window):
    """T = 300 with GQA, padding and sinks: window / chunk spans larger and smaller than the query blocks; W
    of WAAD on both sides of the switch between its two forms (64)."""
    q, k, v = random_qkv(2, 6, 2, 300, 16, with_v=True, seed=3)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[0, :17] = False
    mask[1, 260:] = False
    resp = torch.tensor([150, 40])
    sinks = torch.linspace(-1, 3, 6)
    layer = LayerAttention(sinks=sinks, **spec)
    segments = segments_from_mask(mask, 2, 300, resp, q.device)
    counts = influence_counts(segments, 2, 300, (10, 100))
    got = blocked_attention_metrics(q, k, v, segments, counts, window=window, horizon=(10, 100), scale=0.25,
                                    block=block, layer=layer)
    metrics = rhythm.AttentionMetrics(fai_valid=counts[:, None].expand(2, 6, 300) > 0, **got)
    assert_matches_oracle(metrics, q, k, v, window=window, scale=0.25, attention_mask=mask, response_start=resp,
                          layer=layer)


def test_window_visits_only_visible_keys(monkeypatch):
    """With a window w the torch backend scores O(T * w) keys, not O(T^2)."""
    q, k, _ = random_qkv(1, 2, 1, 1024, 8, seed=5)
    scored = []
    matmul = torch.matmul

    def spy(a, b, *, out=None):
        if out is not None:          # the block-row score product is the only matmul with out=
            scored.append(out.numel())
            return matmul(a, b, out=out)
        return matmul(a, b)

    monkeypatch.setattr(torch, "matmul", spy)
    blocked = rhythm.attention_metrics(q, k, backend="torch", layer=LayerAttention(sliding_window=32))
    monkeypatch.undo()
    block = 256
    assert 0 < sum(scored) <= 2 * 1024 * (32 + block - 1), "keys outside the window were scored"
    assert_matches_oracle(blocked, q, k, layer=LayerAttention(sliding_window=32))


def test_plain_description_equals_none():
    q, k, v = random_qkv(1, 4, 2, 50, 8, with_v=True, seed=9)
    for backend in ("torch", "reference"):
        plain = rhythm.attention_metrics(q, k, v, backend=backend)
        described = rhythm.attention_metrics(q, k, v, backend=backend, layer=LayerAttention())
        for name in ("lse", "distance", "waad", "fai", "out"):
            assert torch.equal(getattr(plain, name), getattr(described, name)), name


def test_window_reaching_past_the_segment_is_plain_causal():
    q, k, _ = random_qkv(1, 2, 2, 60, 8, seed=2)
    plain = rhythm.attention_metrics(q, k, backend="torch")
    wide = rhythm.attention_metrics(q, k, backend="torch", layer=LayerAttention(sliding_window=60, chunk_size=60))
    for name in ("lse", "distance", "waad", "fai"):
        assert torch.allclose(getattr(plain, name), getattr(wide, name), atol=1e-6), name
    narrow = rhythm.attention_metrics(q, k, backend="torch", layer=LayerAttention(sliding_window=59))
    assert not torch.allclose(plain.distance, narrow.distance, atol=1e-6)


def test_sinks_rows_sum_below_one():
    """out = sum_s A v_s with rows summing to < 1: constant v = 1 gives the row mass 1 - exp(sink - lse)."""
    q, k, _ = random_qkv(1, 3, 1, 30, 8, seed=4)
    v = torch.ones(1, 1, 30, 8)
    sinks = torch.tensor([0.0, 2.0, -3.0])
    for backend in ("torch", "reference"):
        m = rhythm.attention_metrics(q, k, v, backend=backend, layer=LayerAttention(sinks=sinks))
        mass = 1 - torch.exp(sinks[:, None] - m.lse[0].double())
        assert torch.allclose(m.out[0, :, :, 0].T.double(), mass, atol=1e-6)
        assert torch.all(mass < 1)


# ----------------------------------------------------------------------------------------------- checks

@pytest.mark.parametrize("field", ["sliding_window", "chunk_size"])
def test_integer_fields(field):
    assert getattr(LayerAttention(**{field: np.int64(4)}), field) == 4
    assert type(getattr(LayerAttention(**{field: np.int32(4)}), field)) is int
    for bad in (True, np.bool_(True), 4.0, "4", torch.tensor(4)):
        with pytest.raises(TypeError, match=field):
            LayerAttention(**{field: bad})
    for bad in (0, -1, np.int64(0)):
        with pytest.raises(ValueError, match=field):
            LayerAttention(**{field: bad})


def test_softcap_field():
    assert LayerAttention(softcap=np.float32(30.0)).softcap == 30.0
    assert LayerAttention(softcap=50).softcap == 50.0
    for bad in (True, "30", torch.tensor(30.0)):
        with pytest.raises(TypeError, match="softcap"):
            LayerAttention(softcap=bad)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            LayerAttention(softcap=bad)


def test_sinks_field():
    for bad in ([0.0, 1.0], torch.tensor([1, 2]), np.zeros(3)):
        with pytest.raises(TypeError, match="sinks"):
            LayerAttention(sinks=bad)
    for bad in (torch.zeros(2, 2), torch.zeros(()), torch.zeros(0)):
        with pytest.raises(ValueError, match="sinks"):
            LayerAttention(sinks=bad)
    q, k, _ = random_qkv(1, 4, 2, 12, 8)
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq\] = \[4\]"):
        rhythm.attention_metrics(q, k, layer=LayerAttention(sinks=torch.zeros(2)))
    with pytest.raises(ValueError, match="sinks must be on the device of q"):
        rhythm.attention_metrics(q, k, layer=LayerAttention(sinks=torch.zeros(4, device="meta")))
    with pytest.raises(ValueError, match="sinks holds NaN"):
        rhythm.attention_metrics(q, k, layer=LayerAttention(sinks=torch.tensor([0.0, float("nan"), 0.0, 0.0])))
    with pytest.raises(TypeError, match="layer must be None or a rhythm.LayerAttention"):
        rhythm.attention_metrics(q, k, layer={"sliding_window": 4})


def test_equality_and_hash():
    a = LayerAttention(sliding_window=4, sinks=torch.tensor([1.0, 2.0]))
    b = LayerAttention(sliding_window=np.int64(4), sinks=torch.tensor([1.0, 2.0]))
    assert a == b and hash(a) == hash(b)
    assert a != LayerAttention(sliding_window=4, sinks=torch.tensor([1.0, 3.0]))
    assert a != LayerAttention(sliding_window=4)
    assert LayerAttention().is_plain and not a.is_plain
    with pytest.raises(Exception):
        a.sliding_window = 5
