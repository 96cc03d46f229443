"""FlashAttention 2 for the layers the capture does not sample (optional: only where flash-attn imports).

The capture records metrics on a few sampled layers; every other layer only needs its attention output. When
the ``flash-attn`` package is importable and the call is one FA2 computes exactly as the model would, those
layers run ``flash_attn_func`` instead of SDPA:

- query on CUDA in fp16 / bf16 (FA2's dtypes), no attention dropout;
- no mask reached the layer: the mask function (SDPA's) skipped it, so the batch is plain causal attention
  over whole rows (no padding, no packed boundaries, no custom pattern);
- one head dim for q, k and v (FA2 takes no v head dim of its own: MLA's D_v != D_qk goes to the delegate);
- nothing FA2 does not take: no sinks (``s_aux``), no position bias. A sliding window (``sliding_window``:
  t - s < w, FA2's ``window_size=(w - 1, 0)``) and logit softcapping (``softcap``) are passed through.

Anything else goes to the usual delegate. Not run here: this machine has neither a GPU nor flash-attn, so
the CUDA test of this path (tests/test_flash.py) skips.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

_FA2_DTYPES = (torch.float16, torch.bfloat16)
_UNSUPPORTED_KWARGS = ("s_aux", "sinks", "position_bias")


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the flash-attn package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


def usable(query: torch.Tensor, attention_mask, dropout: float, kwargs: dict, value: torch.Tensor | None = None) -> bool:
    """True when FA2 computes this (non-sampled) layer's attention exactly as the model's own function would.

    value: the layer's v [B, Hkv, T, D_v] (None: taken to have q's head dim)."""
    return (available() and query.is_cuda and query.dtype in _FA2_DTYPES and attention_mask is None
            and not dropout and all(kwargs.get(name) is None for name in _UNSUPPORTED_KWARGS)
            and (value is None or value.shape[-1] == query.shape[-1]))


def attention(query, key, value, *, scaling: float | None, sliding_window: int | None = None,
              softcap: float | None = None) -> torch.Tensor:
    """Causal attention with FA2. query [B, Hq, T, D], key/value [B, Hkv, T, D] (GQA, not repeated) ->
    out [B, T, Hq, D], the layout transformers' attention functions return."""
    from flash_attn import flash_attn_func

    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1, 0)
    return flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           softmax_scale=scaling, causal=True, window_size=window, softcap=float(softcap or 0.0))
