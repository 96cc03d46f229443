"""The oracle itself, checked against per-element loops written straight from docs/definitions.md section 2."""
import math

import torch

from rhythm_kernels.segments import influence_counts, segments_from_cu_seqlens, segments_from_mask
from tests.oracle_check import oracle, random_qkv


def _loop_metrics(q, k, start, end, resp, window, horizon, scale):
    """Per-element docs/definitions.md section 2 for one head of one sequence, in Python floats (fp64)."""
    h_lo, h_hi = horizon
    n = end - start
    scores = [[scale * float(q[t] @ k[s]) for s in range(n)] for t in range(n)]
    lse, dist, waad, attn = [], [], [], []
    for t in range(n):
        m = max(scores[t][: t + 1])
        z = sum(math.exp(x - m) for x in scores[t][: t + 1])
        row = [math.exp(scores[t][s] - m) / z for s in range(t + 1)]
        attn.append(row)
        lse.append(m + math.log(z))
        dist.append(sum(a * (t - s) for s, a in enumerate(row)))
        waad.append(sum(a * min(t - s, window) for s, a in enumerate(row)))
    fai = []
    for s in range(n):
        last = n - 1 if h_hi is None else min(n - 1, s + h_hi)
        rows = [t for t in range(s + h_lo, last + 1) if t + start >= resp]
        fai.append(sum(attn[t][s] for t in rows) / len(rows) if rows else 0.0)
    return lse, dist, waad, fai


def test_oracle_matches_spec_loops():
    q, k, _ = random_qkv(1, 2, 1, 23, 8, seed=3)
    mask = torch.tensor([[0, 0] + [1] * 19 + [0, 0]])
    window, horizon = 4, (2, 7)
    ref = oracle(q, k, None, window=window, horizon=horizon, attention_mask=mask, response_start=9)
    for head in range(2):
        lse, dist, waad, fai = _loop_metrics(q[0, head, 2:21].double(), k[0, 0, 2:21].double(), 2, 21, 9,
                                             window, horizon, 8 ** -0.5)
        for name, want in (("lse", lse), ("distance", dist), ("waad", waad), ("fai", fai)):
            got = ref[name][0, head, 2:21]
            assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12), name
        assert torch.all(ref["lse"][0, head, :2] == 0) and torch.all(ref["fai"][0, head, 21:] == 0)


def test_influence_counts_brute_force():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 0], [1] * 10])
    segs = segments_from_mask(mask, 2, 10, torch.tensor([4, 0]), torch.device("cpu"))
    for horizon in ((1, 3), (0, None), (2, 2)):
        counts = influence_counts(segs, 2, 10, horizon)
        for b, (start, end, resp) in enumerate(((2, 9, 4), (0, 10, 0))):
            for s in range(10):
                if not start <= s < end:
                    assert counts[b, s] == 0
                    continue
                hi = end - 1 if horizon[1] is None else min(end - 1, s + horizon[1])
                want = sum(1 for t in range(s + horizon[0], hi + 1) if t >= resp)
                assert counts[b, s] == want


def test_packed_segments_are_independent():
    q, k, _ = random_qkv(1, 3, 3, 30, 8, seed=5)
    cu = torch.tensor([0, 12, 30])
    packed = oracle(q, k, None, cu_seqlens=cu, response_start=torch.tensor([4, 20]))
    for (a, e, r) in ((0, 12, 4), (12, 30, 20)):
        alone = oracle(q[:, :, a:e], k[:, :, a:e], None, response_start=r - a)
        for name in ("lse", "distance", "waad", "fai"):
            assert torch.allclose(packed[name][..., a:e], alone[name]), name
    segs = segments_from_cu_seqlens(cu, 1, 30, None, torch.device("cpu"))
    assert segs.host == ((0, 0, 12, 0), (0, 12, 30, 12))
