"""Shared test helpers: random inputs and the docs/definitions.md section 7 comparison against the naive oracle."""
from __future__ import annotations

import torch

from rhythm_kernels.naive import naive_attention_metrics
from rhythm_kernels.segments import segments_from_cu_seqlens, segments_from_mask

METRICS = ("lse", "distance", "waad", "fai")


def random_qkv(batch, q_heads, kv_heads, length, dim, *, dtype=torch.float32, device="cpu", seed=0,
               with_v=False, spread=1.5):
    """q, k (and v) with scores of standard deviation about spread**2: peaked, non-uniform attention."""
    gen = torch.Generator().manual_seed(seed)
    make = lambda heads: (torch.randn(batch, heads, length, dim, generator=gen) * spread)  # noqa: E731
    q, k = make(q_heads), make(kv_heads)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen) if with_v else None
    cast = lambda x: None if x is None else x.to(dtype=dtype, device=device)  # noqa: E731
    return cast(q), cast(k), cast(v)


def oracle(q, k, v, *, window=10, horizon=(10, 100), scale=None, attention_mask=None, response_start=None,
           cu_seqlens=None, compute_dtype=torch.float64, layer=None):
    batch, _, length, dim = q.shape
    if cu_seqlens is not None:
        segments = segments_from_cu_seqlens(cu_seqlens, batch, length, response_start, q.device)
    else:
        segments = segments_from_mask(attention_mask, batch, length, response_start, q.device)
    return naive_attention_metrics(q, k, v, segments, window=window, horizon=horizon,
                                   scale=dim ** -0.5 if scale is None else scale, compute_dtype=compute_dtype,
                                   layer=layer)


def assert_matches_oracle(metrics, q, k, v=None, **kwargs) -> None:
    """docs/definitions.md section 7: fp32 inputs against the fp64 reference with fixed tolerances; fp16/bf16
    inputs within
    2x the error of the low-precision reference (plus a small floor)."""
    ref64 = oracle(q.double(), k.double(), None if v is None else v.double(), **kwargs)
    assert torch.equal(metrics.fai_valid.cpu(), ref64["fai_valid"].cpu()), "fai_valid differs from the oracle"
    names = METRICS + (("out",) if v is not None else ())
    if q.dtype == torch.float32:
        for name in METRICS:
            got, want = getattr(metrics, name).double().cpu(), ref64[name].cpu()
            err = (got - want).abs()
            if name in ("waad", "distance"):
                bound = 1e-4 * (want.abs().clamp_min(1) if name == "distance" else 1)
            else:
                bound = 1e-6 + 1e-4 * want.abs()
            worst = (err - bound).max().item()
            assert worst <= 0, f"{name}: max error {err.max().item():.3g} exceeds docs/definitions.md section 7"
        if v is not None:
            err = (metrics.out.double().cpu() - ref64["out"].cpu()).abs().max().item()
            assert err <= 1e-4, f"out: max error {err:.3g} against the fp64 reference"
        return
    ref_lp = oracle(q, k, v, compute_dtype=q.dtype, **kwargs)
    for name in names:
        got = getattr(metrics, name).double().cpu()
        want, low = ref64[name].cpu(), ref_lp[name].double().cpu()
        bound = 2 * (low - want).abs().max().item() + 1e-5 * (1 + want.abs().max().item())
        err = (got - want).abs().max().item()
        assert err <= bound, f"{name} ({q.dtype}): max error {err:.3g} > bound {bound:.3g}"
