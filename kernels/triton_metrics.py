"""The Triton backend of ``attention_metrics``: the stats pass, then the influence pass.

    stats pass      (triton_stats)      lse, distance, waad [and out]   row-parallel, FlashAttention forward
    influence pass  (triton_influence)  fai from q, k and the stored lse column-parallel, dK/dV shape

Both take their launch plan, tile loads and logit math from ``triton_common``.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import contextlib

import torch

from . import tuned_configs
from .layer_attention import LayerAttention
from .segments import Horizon, Segments
from .triton_common import autotunes, interpreting, length_key
from .triton_influence import influence_pass
from .triton_stats import stats_pass

MAX_HEAD_DIM = 256


def triton_attention_metrics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, segments: Segments,
                             counts: torch.Tensor, *, window: int, horizon: Horizon,
                             scale: float, layer: LayerAttention | None = None) -> dict[str, torch.Tensor]:
    """Exact per-head metrics of causal softmax attention with the fused Triton kernels.

    Args:
        q: [B, Hq, T, D]; k: [B, Hkv, T, D]; v: [B, Hkv, T, Dv] (Hq % Hkv == 0, not repeated; Dv may differ
            from D; D, Dv <= 256; any strides; fp32/fp16/bf16).
        segments: where the sequences live on the T axis (padded rows or packed cu_seqlens).
        counts: int64 [B, T], |T(s)| per key position (``influence_counts``).
        window: W of WAAD. horizon: (H_lo, H_hi), H_hi None = to the segment end. scale: softmax scale.
        layer: the layer's sliding window / chunks / softcap / sinks [Hq] (None = plain causal): both passes
            skip the keys a window or chunk hides (O(T * w) work with a window w).
    Returns:
        {"lse", "distance", "waad", "fai"}: float32 [B, Hq, T], exactly 0 on padding positions, and
        "out": [B, T, Hq, Dv] in q.dtype (zeros on padding rows) when v is given.
    """
    if layer is not None and layer.is_plain:
        layer = None
    for name, x in (("q", q), ("v", v)):
        if x is not None and x.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"{name}: head dim {x.shape[-1]} is not supported by the triton backend (at most "
                             f"{MAX_HEAD_DIM}); use backend='torch'")
    if not (q.device.type == "cuda" or (q.device.type == "cpu" and interpreting())):
        raise ValueError(f"q: the triton backend needs CUDA tensors (or CPU under TRITON_INTERPRET=1), got {q.device}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k: query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]})")
    device_ctx = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        stats_config = _pinned(q, segments, "stats", f"HAS_V={v is not None}", None if v is None else v.shape[-1])
        influence_config = _pinned(q, segments, "influence", f"HAS_HI={horizon[1] is not None}")
        lse, distance, waad, out, norm = stats_pass(q, k, v, segments, window=window, scale=scale, layer=layer,
                                                    config=stats_config)
        fai = influence_pass(q, k, norm, segments, counts, horizon=horizon, scale=scale, layer=layer,
                             config=influence_config)
    result = {"lse": lse, "distance": distance, "waad": waad, "fai": fai}
    if v is not None:
        result["out"] = out
    return result


def _pinned(q: torch.Tensor, segments: Segments, kernel: str, mode: str, v_dim: int | None = None) -> dict | None:
    """The pinned config (``rhythm_kernels.tuned_configs``) where the launcher would autotune, else None."""
    dim = q.shape[-1]
    if q.device.type != "cuda" or not autotunes(q.dtype, dim, v_dim):
        return None
    entries = tuned_configs.load_entries()
    if not entries:
        return None
    return tuned_configs.pinned_config(kernel, torch.cuda.get_device_name(q.device), dim,
                                       str(q.dtype).replace("torch.", ""), mode, length_key(segments.max_len),
                                       entries)
