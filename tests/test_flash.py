"""FlashAttention 2 on the layers the capture does not sample (rhythm.capture.flash): off without flash-attn or CUDA;
where both exist, the same output as SDPA and the capture's records unchanged."""
from __future__ import annotations

import pytest
import torch

from rhythm.capture import flash


def test_not_used_on_cpu_or_without_the_package():
    q = torch.randn(1, 2, 8, 16)
    assert not flash.usable(q, None, 0.0, {})                             # CPU fp32: never
    assert not flash.usable(q.half(), None, 0.0, {})
    if not flash.available():
        assert not flash.usable(q.bfloat16(), None, 0.0, {})


cuda_fa2 = pytest.mark.skipif(not (torch.cuda.is_available() and flash.available()),
                              reason="needs CUDA and the optional flash-attn package")


@cuda_fa2
@pytest.mark.parametrize("window", [None, 16])
def test_fa2_matches_sdpa(window):
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 128, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(2, 2, 128, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(2, 2, 128, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert flash.usable(q, None, 0.0, {"sliding_window": window}, v)
    assert not flash.usable(q, None, 0.0, {}, v[..., :32])               # MLA-like D_v != D_qk: the delegate's
    t = torch.arange(128, device="cuda")
    visible = t[None, :] <= t[:, None]
    if window:
        visible &= t[:, None] - t[None, :] < window
    want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1),
                                          attn_mask=visible).transpose(1, 2)
    got = flash.attention(q, k, v, scaling=64 ** -0.5, sliding_window=window).float()
    assert (got - want).abs().max() < 2e-2                                # bf16 output rounding
