"""The naive oracle: materialise the attention matrix of each sequence and read every quantity of
docs/definitions.md section 2 off it. Slow and memory-hungry on purpose (O(T^2) per head): it is the
reference of every test.

    S[t,s] = scale * q_t . k_s   (softcap * tanh(S / softcap) with a softcap)
    A[t,s] = exp(S[t,s] - lse[t]) on the keys row t sees (s <= t, window, chunk), 0 elsewhere
    lse[t]      = log(exp(sink) + sum_{visible s} exp(S[t,s]))   (no exp(sink) term without sinks)
    distance[t] = sum_s A[t,s] * (t - s)
    waad[t]     = sum_s A[t,s] * min(t - s, W)
    fai[s]      = mean_{t in T(s)} A[t,s],  T(s) = { t in R : s + H_lo <= t <= min(N-1, s + H_hi) }

The mechanisms of ``layer`` (a ``LayerAttention``) are defined in ``rhythm_kernels.layer_attention``.
"""
from __future__ import annotations

import torch

from .layer_attention import LayerAttention
from .segments import Horizon, Segments, influence_counts


def _visible(n: int, layer: LayerAttention | None, device) -> torch.Tensor:
    """bool [n, n]: row t sees key s (positions counted from the segment's first real token)."""
    t = torch.arange(n, device=device)
    lag = t[:, None] - t[None, :]
    visible = lag >= 0
    if layer is not None and layer.sliding_window is not None:
        visible &= lag < layer.sliding_window
    if layer is not None and layer.chunk_size is not None:
        chunk = t // layer.chunk_size
        visible &= chunk[:, None] == chunk[None, :]
    return visible


def naive_attention_metrics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, segments: Segments, *,
                            window: int, horizon: Horizon, scale: float,
                            compute_dtype: torch.dtype = torch.float64,
                            layer: LayerAttention | None = None) -> dict[str, torch.Tensor]:
    """Materialised reference.

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] (Dv may differ from D). Every product, softmax and
    sum runs in ``compute_dtype`` (float64 for the exact reference; the input's fp16/bf16 for the
    low-precision reference of docs/definitions.md section 7).
    layer: the layer's window / chunk / softcap / sinks (None = plain causal).
    Returns lse, distance, waad, fai ([B, Hq, T], compute_dtype, 0 on padding), fai_valid (bool [B, Hq, T])
    and out ([B, T, Hq, Dv] in compute_dtype) when v is given.
    """
    batch, heads, length, _ = q.shape
    group = heads // k.shape[1]
    h_lo, h_hi = horizon
    zeros = lambda: torch.zeros(batch, heads, length, dtype=compute_dtype, device=q.device)  # noqa: E731
    result = {name: zeros() for name in ("lse", "distance", "waad", "fai")}
    if v is not None:
        result["out"] = torch.zeros(batch, length, heads, v.shape[-1], dtype=compute_dtype, device=q.device)
    counts = influence_counts(segments, batch, length, horizon)
    softcap = None if layer is None else layer.softcap
    sinks = None if layer is None or layer.sinks is None else layer.sinks.detach().to(compute_dtype)

    for span in segments.spans:
        b, start, end, resp = span.row, span.start, span.end, span.response_start
        n = end - start
        qs = q[b, :, start:end].detach().to(compute_dtype)
        ks = k[b, :, start:end].detach().to(compute_dtype).repeat_interleave(group, dim=0)
        scores = (qs @ ks.transpose(-1, -2)) * scale                       # [Hq, n, n]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        t = torch.arange(n, device=q.device)
        lag = t[:, None] - t[None, :]                                        # lag[t, s] = t - s
        scores = scores.masked_fill(~_visible(n, layer, q.device), float("-inf"))
        logits = scores
        if sinks is not None:   # the sink is one more logit in every row's normaliser, with no key position
            logits = torch.cat([scores, sinks[:, None, None].expand(heads, n, 1)], dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        attn = torch.softmax(logits, dim=-1)[..., :n]                        # exactly 0 on invisible keys
        result["lse"][b, :, start:end] = lse
        result["distance"][b, :, start:end] = (attn * lag.clamp_min(0).to(compute_dtype)).sum(-1)
        result["waad"][b, :, start:end] = (attn * lag.clamp(0, window).to(compute_dtype)).sum(-1)
        # FAI: column means over the attending rows t in R within the horizon band below the diagonal.
        in_band = (lag >= h_lo) & ((t[:, None] + start) >= resp)
        if h_hi is not None:
            in_band &= lag <= h_hi
        column_sums = (attn * in_band.to(compute_dtype)).sum(dim=-2)           # [Hq, n]
        count = counts[b, start:end].to(compute_dtype)
        result["fai"][b, :, start:end] = torch.where(count > 0, column_sums / count.clamp_min(1), 0)
        if v is not None:
            vs = v[b, :, start:end].detach().to(compute_dtype).repeat_interleave(group, dim=0)
            result["out"][b, start:end] = (attn @ vs).transpose(0, 1)
    result["fai_valid"] = (counts > 0)[:, None, :].expand(batch, heads, length).clone()
    return result
