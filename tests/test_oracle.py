"""The tests' oracle (tests/oracle_check.py) checked against per-element Python loops written straight from
docs/definitions.md section 2, and the package's layout helpers checked against brute force."""
import math
from types import SimpleNamespace

import pytest
import torch

from rhythm_kernels.segments import influence_counts, segments_from_cu_seqlens, segments_from_mask
from tests.oracle_check import brute_force_count, brute_force_layout, oracle, random_qkv


def _loop_metrics(q, k, start, end, resp, window, horizon, scale, *, sliding=None, chunk=None, softcap=None,
                  sink=None):
    """Per-element definitions for one head of one sequence, in Python floats (fp64)."""
    h_lo, h_hi = horizon
    n = end - start

    def visible(t, s):
        return s <= t and (sliding is None or t - s < sliding) and (chunk is None or t // chunk == s // chunk)

    def logit(t, s):
        x = scale * float(q[t] @ k[s])
        return x if softcap is None else softcap * math.tanh(x / softcap)

    lse, dist, waad, attn = [], [], [], []
    for t in range(n):
        keys = [s for s in range(n) if visible(t, s)]
        terms = [logit(t, s) for s in keys] + ([sink] if sink is not None else [])
        m = max(terms)
        z = sum(math.exp(x - m) for x in terms)
        row = [0.0] * n
        for s in keys:
            row[s] = math.exp(logit(t, s) - m) / z
        attn.append(row)
        lse.append(m + math.log(z))
        dist.append(sum(row[s] * (t - s) for s in keys))
        waad.append(sum(row[s] * min(t - s, window) for s in keys))
    fai = []
    for s in range(n):
        last = n - 1 if h_hi is None else min(n - 1, s + h_hi)
        rows = [t for t in range(s + h_lo, last + 1) if t + start >= resp]
        fai.append(sum(attn[t][s] for t in rows) / len(rows) if rows else 0.0)
    return lse, dist, waad, fai


LAYERS = {
    "causal": {},
    "window": {"sliding": 5},
    "chunk": {"chunk": 6},
    "softcap": {"softcap": 1.5},
    "sink": {"sink": 0.7},
    "all": {"sliding": 4, "chunk": 7, "softcap": 2.0, "sink": -0.3},
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_oracle_matches_per_element_loops(name):
    opts = LAYERS[name]
    q, k, _ = random_qkv(1, 2, 1, 23, 8, seed=3)
    mask = torch.tensor([[0, 0] + [1] * 19 + [0, 0]])
    window, horizon = 4, (2, 7)
    layer = None
    if opts:
        sinks = torch.full((2,), opts["sink"]) if "sink" in opts else None
        layer = SimpleNamespace(sliding_window=opts.get("sliding"), chunk_size=opts.get("chunk"),
                                softcap=opts.get("softcap"), sinks=sinks)
    ref = oracle(q, k, None, window=window, horizon=horizon, attention_mask=mask, response_start=9, layer=layer)
    for head in range(2):
        loops = _loop_metrics(q[0, head, 2:21].double(), k[0, 0, 2:21].double(), 2, 21, 9, window, horizon,
                              8 ** -0.5, **opts)
        for field, want in zip(("lse", "distance", "waad", "fai"), loops):
            got = ref[field][0, head, 2:21]
            assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12), field
        assert torch.all(ref["lse"][0, head, :2] == 0) and torch.all(ref["fai"][0, head, 21:] == 0)


def test_brute_force_layout_reads_the_raw_arguments():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert brute_force_layout(3, 6, mask, torch.tensor([3, 0, 0])) == [(0, 2, 5, 3), (1, 0, 6, 0), (2, 0, 0, 0)]
    assert brute_force_layout(1, 9, None, None, torch.tensor([0, 4, 9])) == [(0, 0, 4, 0), (0, 4, 9, 4)]
    assert brute_force_count(2, 5, 3, (1, 1)) == 1 and brute_force_count(0, 9, 0, (0, None)) == 9


def test_influence_counts_brute_force():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 0], [1] * 10])
    segs = segments_from_mask(mask, 2, 10, torch.tensor([4, 0]), torch.device("cpu"))
    for horizon in ((1, 3), (0, None), (2, 2)):
        counts = influence_counts(segs, 2, 10, horizon)
        for b, (start, end, resp) in enumerate(((2, 9, 4), (0, 10, 0))):
            for s in range(10):
                want = brute_force_count(s, end, resp, horizon) if start <= s < end else 0
                assert counts[b, s] == want, (horizon, b, s)


def test_packed_segments_are_independent():
    q, k, _ = random_qkv(1, 3, 3, 30, 8, seed=5)
    cu = torch.tensor([0, 12, 30])
    packed = oracle(q, k, None, cu_seqlens=cu, response_start=torch.tensor([4, 20]))
    for (a, e, r) in ((0, 12, 4), (12, 30, 20)):
        alone = oracle(q[:, :, a:e], k[:, :, a:e], None, response_start=r - a)
        for name in ("lse", "distance", "waad", "fai"):
            assert torch.allclose(packed[name][..., a:e], alone[name]), name
    segs = segments_from_cu_seqlens(cu, 1, 30, None, torch.device("cpu"))
    assert segs.spans == ((0, 0, 12, 0), (0, 12, 30, 12))
