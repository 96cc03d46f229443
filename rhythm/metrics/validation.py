"""Argument checks for ``attention_metrics``: every bad input raises ValueError/TypeError that names the
argument and says what was expected, before any kernel runs."""
from __future__ import annotations

import math
import numbers
import os

import torch

from rhythm_kernels.segments import FLOAT32_MAX, FLOAT32_TINY, is_bool

from rhythm.config import KNOBS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_qkv(q, k, v) -> None:
    """q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] (Dv may differ from D: MLA), Hq % Hkv == 0, one
    dtype and device."""
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
    if v is not None and tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"v must have shape [B, Hkv, T, Dv] = [{batch}, {kv_heads}, {length}, Dv] to match k (its "
                         f"head dim Dv may differ from D), got {tuple(v.shape)}")
    if length == 0 or dim == 0 or batch == 0 or q_heads == 0:
        raise ValueError(f"q must be non-empty in every dimension, got shape {tuple(q.shape)}")
    if v is not None and v.shape[3] == 0:
        raise ValueError(f"v must have a head dim Dv >= 1, got shape {tuple(v.shape)}")


def check_finite_on(real: torch.Tensor, **tensors) -> None:
    """NaN/Inf in the inputs would spread silently through the softmax: refuse them on the real positions.

    real: bool [B, T], True on the positions some sequence covers; tensors [B, H, T, D]. Padding positions
    are never read by any backend, so whatever they hold is allowed. One host synchronisation in all."""
    names = [name for name, x in tensors.items() if x is not None]
    flags = [(real & ~torch.isfinite(tensors[name]).all(dim=-1).all(dim=1)).any() for name in names]
    for name, bad in zip(names, torch.stack(flags).tolist()):
        if bad:
            raise ValueError(f"{name} holds NaN or Inf values on real (non-padding) positions")


def check_options(window, horizon, scale, backend, validate=True) -> tuple[int, tuple[int, int | None]]:
    """window, horizon and backend follow ``rhythm.config`` (Python or numpy integers, never bools), scale a
    float in float32's normal range, validate a bool; returns (window, horizon) as Python ints."""
    window = KNOBS["window"].check(window)
    horizon = KNOBS["horizon"].check(horizon)
    if scale is not None and (is_bool(scale) or not isinstance(scale, numbers.Real) or not math.isfinite(scale)
                              or not FLOAT32_TINY <= scale <= FLOAT32_MAX):
        raise ValueError(f"scale must be None or a finite float > 0 in float32's normal range "
                         f"[{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}] (the scores are float32), got {scale!r}")
    KNOBS["backend"].check(backend)
    if not is_bool(validate):
        raise TypeError(f"validate must be a bool (True or False), got {validate!r}")
    return window, horizon


def as_mask_tensor(attention_mask, device: torch.device):
    """attention_mask given as a nested list / tuple / numpy array becomes a tensor on ``device``."""
    if attention_mask is None or isinstance(attention_mask, torch.Tensor):
        return attention_mask
    try:
        mask = torch.as_tensor(attention_mask, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"attention_mask must be a [B, T] tensor (or nested list) of 0/1 or bool, got "
                        f"{type(attention_mask).__name__} ({error})") from None
    if mask.dtype != torch.bool and mask.dtype.is_complex:
        raise TypeError(f"attention_mask must hold 0/1 or bool values, got dtype {mask.dtype}")
    return mask


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
    for i, span in enumerate(segments.spans):
        if not (0 <= span.row < batch and 0 <= span.start < span.end <= length
                and span.start <= span.response_start <= span.end):
            raise ValueError(f"segments[{i}] = (row {span.row}, start {span.start}, end {span.end}, response_start "
                             f"{span.response_start}) does not fit q with B = {batch}, T = {length}")
    if tuple(segments.shape) != (batch, length):
        raise ValueError(f"segments describe a layout of shape (B, T) = {tuple(segments.shape)}, but q has "
                         f"B = {batch}, T = {length}")
    missing = sorted(set(range(batch)) - {span.row for span in segments.spans})
    if missing:   # such a row would come back all zeros, as if it were padding
        raise ValueError(f"segments leave batch row(s) {missing[:8]} of B = {batch} without a sequence: every row "
                         "of q needs at least one segment")
