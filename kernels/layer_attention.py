"""What one attention layer really computes, beyond plain causal softmax: the per-layer description every
backend takes (``attention_metrics(..., layer=LayerAttention(...))``).

With a description, key s is *visible* from row t of the same segment when

    s <= t                                   (causal)
    t - s < sliding_window                   (transformers' convention: the row itself plus w - 1 keys back)
    (t - a) // chunk_size == (s - a) // chunk_size     (a = the segment's first real position, position id 0)

and the probabilities are those of the layer:

    S'[t,s] = softcap * tanh(scale * q_t . k_s / softcap)         (S' = scale * q_t . k_s without softcap)
    lse[t]  = log(exp(sink_h) + sum_{visible s} exp(S'[t,s]))       (without sinks: the usual log-sum-exp)
    A[t,s]  = exp(S'[t,s] - lse[t]) on visible keys, 0 elsewhere    (rows sum to < 1 with a sink)

distance, waad and fai are the usual formulas on this A; |T(s)| and fai_valid do not depend on the layer
(a row that cannot see s adds 0 to fai[s]). Window and chunk may both be set (their intersection).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .segments import FLOAT32_MAX, FLOAT32_TINY, INDEX_LIMIT, is_bool, is_integer


def _positive_int(name: str, value) -> int | None:
    """None, or an int in [1, 2**62] (Python or numpy integers; bools refused)."""
    if value is None:
        return None
    if not is_integer(value):
        raise TypeError(f"LayerAttention.{name} must be None or an int >= 1, got {value!r} "
                        f"({type(value).__name__})")
    if not 1 <= value <= INDEX_LIMIT:
        raise ValueError(f"LayerAttention.{name} must be None or an int >= 1 (at most 2**62), got {value!r}")
    return int(value)


def _positive_float(name: str, value) -> float | None:
    """None, or a float in float32's normal range [2**-126, 3.4e38] (Python or numpy numbers; bools refused):
    the kernels divide by it in float32."""
    if value is None:
        return None
    if is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"LayerAttention.{name} must be None or a finite float > 0, got {value!r} "
                        f"({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or not FLOAT32_TINY <= value <= FLOAT32_MAX:
        raise ValueError(f"LayerAttention.{name} must be None or a finite float > 0 in float32's normal range "
                         f"[{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}], got {value!r}")
    return value


@dataclass(frozen=True)
class LayerAttention:
    """Per-layer attention mechanisms: sliding window, chunking, logit softcapping, attention sinks.

    All fields None (the default) is plain causal softmax attention.

    Attributes:
        sliding_window: row t sees key s only if t - s < sliding_window (int >= 1).
        chunk_size: row t sees key s only if both lie in the same chunk of ``chunk_size`` positions, counted
            from the segment's first real position (int >= 1).
        softcap: logits S = scale * q.k become softcap * tanh(S / softcap) (finite float > 0).
        sinks: float tensor [Hq], one sink logit per query head: adds exp(sink) to the row's softmax
            denominator (rows sum to < 1; the sink is no key position). Must lie on q's device and be
            finite (checked by ``attention_metrics``).
    """

    sliding_window: int | None = None
    chunk_size: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sliding_window", _positive_int("sliding_window", self.sliding_window))
        object.__setattr__(self, "chunk_size", _positive_int("chunk_size", self.chunk_size))
        object.__setattr__(self, "softcap", _positive_float("softcap", self.softcap))
        sinks = self.sinks
        if sinks is not None:
            if not isinstance(sinks, torch.Tensor):
                raise TypeError(f"LayerAttention.sinks must be None or a float tensor [Hq], got "
                                f"{type(sinks).__name__}")
            if not sinks.dtype.is_floating_point:
                raise TypeError(f"LayerAttention.sinks must be a float tensor [Hq], got dtype {sinks.dtype}")
            if sinks.dim() != 1 or sinks.numel() == 0:
                raise ValueError(f"LayerAttention.sinks must have shape [Hq] (one logit per query head), got "
                                 f"shape {tuple(sinks.shape)}")

    @property
    def is_plain(self) -> bool:
        """True when the description is plain causal attention (every field None)."""
        return (self.sliding_window is None and self.chunk_size is None and self.softcap is None
                and self.sinks is None)

    def check_for(self, q: torch.Tensor, *, finite: bool = True) -> None:
        """Checks against the queries q [B, Hq, T, D]: sinks of shape [Hq] on q's device (and finite: one
        host synchronisation, skipped with finite=False)."""
        if self.sinks is None:
            return
        heads = q.shape[1]
        if tuple(self.sinks.shape) != (heads,):
            raise ValueError(f"LayerAttention.sinks must have shape [Hq] = [{heads}] (one logit per query head "
                             f"of q), got {tuple(self.sinks.shape)}")
        if self.sinks.device != q.device:
            raise ValueError(f"LayerAttention.sinks must be on the device of q ({q.device}), got "
                             f"{self.sinks.device}")
        if finite and not bool(torch.isfinite(self.sinks).all()):
            raise ValueError("LayerAttention.sinks holds NaN or Inf values")

    def __eq__(self, other) -> bool:
        if not isinstance(other, LayerAttention):
            return NotImplemented
        same_sinks = (self.sinks is None and other.sinks is None) or (
            self.sinks is not None and other.sinks is not None and self.sinks.shape == other.sinks.shape
            and self.sinks.device == other.sinks.device and torch.equal(self.sinks, other.sinks))
        return (self.sliding_window, self.chunk_size, self.softcap) == (
            other.sliding_window, other.chunk_size, other.softcap) and same_sinks

    def __hash__(self) -> int:
        # Equal descriptions hash equally: the sink values are left out (their presence is kept).
        return hash((self.sliding_window, self.chunk_size, self.softcap, self.sinks is None))


def check_layer(layer, q: torch.Tensor, *, finite: bool = True) -> LayerAttention | None:
    """``layer`` argument of the backends: None (plain causal) or a LayerAttention fitting q."""
    if layer is None:
        return None
    if not isinstance(layer, LayerAttention):
        raise TypeError(f"layer must be None or a rhythm.LayerAttention, got {type(layer).__name__}")
    layer.check_for(q, finite=finite)
    return None if layer.is_plain else layer
