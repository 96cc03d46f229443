"""Hypothesis over the Triton backend (interpreter without CUDA): GQA ratios 1, 2, 4 and 8 query heads per KV
head with 1, 2 and 3 KV heads, padded (left/right/both) and packed layouts, response starts and horizons,
against the brute-force oracle of tests/oracle_check.py (it shares no code with the kernels).

Few small examples per ratio (T <= 128) keep the file near 30 s on two shared cores. A wrong kv-head mapping
in either pass fails the ratios > 1 with Hkv > 1 (checked: h % Hkv instead of h // group in the stats pass,
scripts/mutation_check.py; the query head g * Hkv + kv instead of kv * group + g in the influence pass).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

os.environ.setdefault("RHYTHM_TRITON_AUTOTUNE", "0")

import rhythm  # noqa: E402
from tests.oracle_check import assert_matches_oracle, random_qkv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def layouts(draw, max_len=128):
    """(batch, T, layout kwargs, horizon, window): padded rows or one packed row, response starts inside."""
    h_lo = draw(st.integers(0, 12))
    horizon = (h_lo, draw(st.one_of(st.none(), st.integers(h_lo, h_lo + 40))))
    window = draw(st.sampled_from([1, 10, 40]))
    if draw(st.booleans()):                                   # packed: B = 1, cu_seqlens
        lengths = draw(st.lists(st.integers(1, 50), min_size=2, max_size=4))
        bounds = [0]
        for n in lengths:
            bounds.append(min(bounds[-1] + n, max_len))
            if bounds[-1] == max_len:
                break
        bounds = sorted(set(bounds))
        resp = [draw(st.integers(a, e)) for a, e in zip(bounds[:-1], bounds[1:])]
        layout = dict(cu_seqlens=torch.tensor(bounds, device=DEVICE), response_start=torch.tensor(resp, device=DEVICE))
        return 1, bounds[-1], layout, horizon, window
    batch = draw(st.integers(1, 2))
    length = draw(st.integers(2, max_len))
    mask = torch.zeros(batch, length, dtype=torch.bool)
    resp = []
    for b in range(batch):
        side = draw(st.sampled_from(["left", "right", "both", "none"]))
        n = draw(st.integers(1, length))
        start = {"left": length - n, "right": 0, "none": 0, "both": (length - n) // 2}[side]
        n = length if side == "none" else n
        mask[b, start:start + n] = True
        resp.append(draw(st.integers(start, start + n)))
    layout = dict(attention_mask=mask.to(DEVICE), response_start=torch.tensor(resp, device=DEVICE))
    return batch, length, layout, horizon, window


@pytest.mark.parametrize("group,kv_heads", [(1, 3), (2, 2), (4, 1), (8, 2)])
# no shrinking: under the interpreter it takes minutes; the failing example is printed as drawn
@settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(case=layouts(), dim=st.sampled_from([16, 48]), seed=st.integers(0, 2 ** 16), with_v=st.booleans())
def test_triton_gqa_property(group, kv_heads, case, dim, seed, with_v):
    batch, length, layout, horizon, window = case
    q, k, v = random_qkv(batch, group * kv_heads, kv_heads, length, dim, device=DEVICE, seed=seed, with_v=with_v)
    metrics = rhythm.attention_metrics(q, k, v, backend="triton", window=window, horizon=horizon, **layout)
    assert_matches_oracle(metrics, q, k, v, window=window, horizon=horizon, **layout)
