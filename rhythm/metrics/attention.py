"""``attention_metrics``: the per-head docs/definitions.md section 2 quantities, without materialising attention."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rhythm_kernels.layer_attention import LayerAttention, check_layer
from rhythm_kernels.segments import (Segments, influence_counts, position_table, segments_from_cu_seqlens,
                                     segments_from_mask)

from rhythm.metrics import validation


@dataclass
class AttentionMetrics:
    """Per query head metrics of one attention layer.

    lse, distance, waad, fai: float32 [B, Hq, T] (0 on padding). fai_valid: bool [B, Hq, T] (False on
    padding and where the horizon holds no response row). out: [B, T, Hq, Dv] in the input dtype, only when v
    was given (the attention output, in the layout transformers' attention functions return). Every field is
    detached: the metrics are forward only.
    """

    lse: torch.Tensor
    distance: torch.Tensor
    waad: torch.Tensor
    fai: torch.Tensor
    fai_valid: torch.Tensor
    out: torch.Tensor | None = None


def _run_backend(name, q, k, v, segments, counts, window, horizon, scale,
                 layer: LayerAttention | None = None) -> dict[str, torch.Tensor]:
    if name == "reference":
        from rhythm_kernels.naive import naive_attention_metrics

        ref = naive_attention_metrics(q, k, v, segments, window=window, horizon=horizon, scale=scale, layer=layer)
        result = {key: ref[key].float() for key in ("lse", "distance", "waad", "fai")}
        if v is not None:
            result["out"] = ref["out"].to(q.dtype)
        return result
    if name == "torch":
        from rhythm_kernels.torch_blocked import blocked_attention_metrics

        return blocked_attention_metrics(q, k, v, segments, counts, window=window, horizon=horizon, scale=scale,
                                         layer=layer)
    from rhythm_kernels.triton_metrics import triton_attention_metrics

    return triton_attention_metrics(q, k, v, segments, counts, window=window, horizon=horizon, scale=scale,
                                    layer=layer)


def attention_metrics(q, k, v=None, *, window=10, horizon=(10, 100), scale=None, attention_mask=None,
                      response_start=None, cu_seqlens=None, backend="auto", validate=True,
                      segments: Segments | None = None, layer: LayerAttention | None = None) -> AttentionMetrics:
    """Exact per-head lse, distance, WAAD and FAI of causal softmax attention (docs/definitions.md sections 2 and 8).

    Args:
        q: [B, Hq, T, D] post-RoPE queries. k: [B, Hkv, T, D] (Hq % Hkv == 0, not repeated); v: [B, Hkv, T, Dv]
            (Dv may differ from D: MLA's 192 / 128, v not padded). v is
            optional: with it the attention output is returned too. Forward only, in every backend: inputs
            that require grad are read detached, and nothing returned (``out`` included) tracks gradients,
            so ``out`` cannot stand in for a differentiable attention during training.
        window: W of WAAD (min(t - s, W)). horizon: (H_lo, H_hi) of FAI, H_hi None = to the end.
        scale: softmax scale, default 1/sqrt(D).
        attention_mask: [B, T] tensor (or nested list / numpy array), 1/True on real tokens forming one
            contiguous span per row (None = all real).
        response_start: int (Python or numpy), or integer tensor / numpy array [B] ([n_segments] with
            cu_seqlens): absolute T index of each sequence's first response token. None = every position is a
            response position.
        cu_seqlens: LongTensor [n_segments + 1] of packed segment boundaries (B must be 1, mask None).
        backend: "auto" (triton on CUDA, torch otherwise) | "triton" | "torch" | "reference".
        validate: check q/k/v (and the layer's sinks) for NaN/Inf on real positions (one host synchronisation;
            padding positions are never read, so they may hold anything). Shapes and masks are always checked.
        segments: a layout already built with ``rhythm_kernels.segments`` (``segments_from_mask`` /
            ``segments_from_cu_seqlens``), in place of attention_mask / response_start / cu_seqlens. Reading
            a mask costs a host synchronisation; callers that run several layers over one batch (the capture)
            build the layout once and pass it to every layer. Checked against q's B, T and device on the host.
        layer: the layer's attention mechanisms (``rhythm.LayerAttention``: sliding window, chunks, logit
            softcap, sink logits [Hq] on q's device). The metrics are computed on the probabilities the layer
            really uses; None = plain causal softmax.
    """
    validation.check_qkv(q, k, v)
    window, horizon = validation.check_options(window, horizon, scale, backend, validate)
    batch, heads, length, dim = q.shape
    attention_mask = validation.as_mask_tensor(attention_mask, q.device)
    for name, x in (("attention_mask", attention_mask), ("cu_seqlens", cu_seqlens),
                    ("response_start", response_start)):
        validation.check_mask_device(name, x, q.device)
    if segments is not None:
        if attention_mask is not None or response_start is not None or cu_seqlens is not None:
            raise ValueError("segments replaces attention_mask, response_start and cu_seqlens: pass one or the other")
        validation.check_segments(segments, batch, length, q.device)
    elif cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("attention_mask must be None with cu_seqlens (a packed batch has no padding)")
        segments = segments_from_cu_seqlens(cu_seqlens, batch, length, response_start, q.device)
    else:
        segments = segments_from_mask(attention_mask, batch, length, response_start, q.device)
    if validate:
        validation.check_finite_on(position_table(segments, batch, length)["real"], q=q, k=k, v=v)
    layer = check_layer(layer, q, finite=validate)
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" else "torch"
    if backend == "triton" and not validation.triton_available(q.device):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got q on {q.device}")
    scale = float(scale) if scale is not None else dim ** -0.5
    counts = influence_counts(segments, batch, length, horizon)
    # Forward only: every backend reads detached inputs, and nothing returned tracks gradients.
    q, k, v = q.detach(), k.detach(), None if v is None else v.detach()
    if layer is not None and layer.sinks is not None:
        layer = dataclasses.replace(layer, sinks=layer.sinks.detach())
    with torch.no_grad():
        result = _run_backend(backend, q, k, v, segments, counts, window, horizon, scale, layer)
    fai_valid = (counts > 0)[:, None, :].expand(batch, heads, length).clone()
    return AttentionMetrics(lse=result["lse"], distance=result["distance"], waad=result["waad"],
                            fai=result["fai"], fai_valid=fai_valid, out=result.get("out"))
