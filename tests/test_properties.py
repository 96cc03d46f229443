"""Hypothesis: random shapes, paddings, packings, response starts and options against the oracle."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rhythm
from tests.oracle_check import assert_matches_oracle, random_qkv


@st.composite
def cases(draw):
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 3]))
    dim = draw(st.sampled_from([8, 16]))
    window = draw(st.integers(1, 12))
    h_lo = draw(st.integers(0, 6))
    h_hi = draw(st.one_of(st.none(), st.integers(h_lo, h_lo + 20)))
    packed = draw(st.booleans())
    if packed:
        lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=4))
        total = sum(lengths)
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        resp = [draw(st.integers(a, e)) for a, e in zip(bounds[:-1], bounds[1:])]
        layout = dict(cu_seqlens=torch.tensor(bounds), response_start=torch.tensor(resp))
        batch = 1
    else:
        batch = draw(st.integers(1, 3))
        total = draw(st.integers(1, 60))
        mask = torch.zeros(batch, total, dtype=torch.bool)
        resp = []
        for b in range(batch):
            a = draw(st.integers(0, total - 1))
            e = draw(st.integers(a + 1, total))
            mask[b, a:e] = True
            resp.append(draw(st.integers(a, e)))
        layout = dict(attention_mask=mask, response_start=torch.tensor(resp))
    seed = draw(st.integers(0, 2**16))
    return (batch, kv_heads * group, kv_heads, total, dim, seed), dict(window=window, horizon=(h_lo, h_hi),
                                                                       **layout)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_torch_backend_matches_oracle(case):
    (batch, q_heads, kv_heads, length, dim, seed), kwargs = case
    q, k, v = random_qkv(batch, q_heads, kv_heads, length, dim, seed=seed, with_v=True)
    metrics = rhythm.attention_metrics(q, k, v, backend="torch", **kwargs)
    assert_matches_oracle(metrics, q, k, v, **kwargs)
