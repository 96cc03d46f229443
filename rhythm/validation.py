"""Argument checks for ``attention_metrics``: every bad input raises ValueError/TypeError that names the
argument and says what was expected, before any kernel runs."""
from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch", "reference")


def check_qkv(q, k, v) -> None:
    """q [B, Hq, T, D], k/v [B, Hkv, T, D], Hq % Hkv == 0, one dtype and device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None and name == "v":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, T, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, H, T, D] (transformers layout), got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    batch, q_heads, length, dim = q.shape
    if k.dtype != q.dtype or (v is not None and v.dtype != q.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}"
                        + (f", v {v.dtype}" if v is not None else ""))
    if k.device != q.device or (v is not None and v.device != q.device):
        raise ValueError(f"q, k and v must be on one device, got q on {q.device}, k on {k.device}"
                         + (f", v on {v.device}" if v is not None else ""))
    if k.shape[0] != batch or k.shape[2] != length or k.shape[3] != dim:
        raise ValueError(f"k must have shape [B, Hkv, T, D] = [{batch}, Hkv, {length}, {dim}] to match q, "
                         f"got {tuple(k.shape)}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"the query heads of q ({q_heads}) must be a multiple of the key heads of k ({kv_heads}) "
                         "(GQA: pass k unrepeated)")
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if length == 0 or dim == 0 or batch == 0 or q_heads == 0:
        raise ValueError(f"q must be non-empty in every dimension, got shape {tuple(q.shape)}")


def check_finite(**tensors) -> None:
    """NaN/Inf in the inputs would spread silently through the softmax: refuse them (one host sync)."""
    for name, x in tensors.items():
        if x is not None and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} holds NaN or Inf values")


def check_options(window, horizon, scale, backend) -> tuple[int, int | None]:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if not isinstance(horizon, (tuple, list)) or len(horizon) != 2:
        raise ValueError(f"horizon must be a pair (H_lo, H_hi) with H_hi None for 'to the end', got {horizon!r}")
    h_lo, h_hi = horizon
    if isinstance(h_lo, bool) or not isinstance(h_lo, int) or h_lo < 0:
        raise ValueError(f"horizon H_lo must be an int >= 0, got {h_lo!r}")
    if h_hi is not None and (isinstance(h_hi, bool) or not isinstance(h_hi, int) or h_hi < h_lo):
        raise ValueError(f"horizon H_hi must be None or an int >= H_lo = {h_lo}, got {h_hi!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be None or a finite float > 0, got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return h_lo, h_hi


def check_mask_device(name: str, x, device: torch.device) -> None:
    if isinstance(x, torch.Tensor) and x.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {x.device}")


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_segments(segments, batch: int, length: int, device: torch.device) -> None:
    """A prebuilt layout must fit q: rows in [0, B), 0 <= start < end <= T, start <= response_start <= end
    (checked on its host copy: no device synchronisation)."""
    from rhythm_kernels.segments import Segments

    if not isinstance(segments, Segments):
        raise TypeError(f"segments must be a rhythm_kernels.segments.Segments, got {type(segments).__name__}")
    if segments.start.device != device:
        raise ValueError(f"segments must be on the device of q ({device}), got {segments.start.device}")
    for i, (row, start, end, resp) in enumerate(segments.host):
        if not (0 <= row < batch and 0 <= start < end <= length and start <= resp <= end):
            raise ValueError(f"segments[{i}] = (row {row}, start {start}, end {end}, response_start {resp}) does "
                             f"not fit q with B = {batch}, T = {length}")
