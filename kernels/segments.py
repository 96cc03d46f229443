"""One description of where sequences live on the T axis, shared by every backend.

A padded batch (left and/or right padding, ``attention_mask [B, T]``) and a packed varlen batch
(``B = 1`` with ``cu_seqlens``) both reduce to a list of *segments*: for each sequence, its batch row, the
first real position ``start``, one past the last real position ``end`` and the first response position
``response_start`` (``start <= response_start <= end``), all absolute on the T axis.

Inside a segment the attention is causal and never crosses the segment's boundaries.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

Horizon = tuple[int, int | None]


@dataclass(frozen=True)
class Segments:
    """Per-sequence boundaries on the T axis (all int64 [S], on the device of the inputs).

    ``host`` keeps the same numbers as Python ints for the host-side loops of the torch backend and for
    launch-grid sizing, so that neither needs another device synchronisation.
    """

    batch: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    response_start: torch.Tensor
    host: tuple[tuple[int, int, int, int], ...]  # (batch, start, end, response_start) per segment

    @property
    def count(self) -> int:
        return len(self.host)

    @property
    def max_len(self) -> int:
        return max((e - s for _, s, e, _ in self.host), default=0)

    @classmethod
    def from_host(cls, rows: list[tuple[int, int, int, int]], device: torch.device) -> "Segments":
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        table = table.to(device)
        return cls(
            batch=table[:, 0].contiguous(),
            start=table[:, 1].contiguous(),
            end=table[:, 2].contiguous(),
            response_start=table[:, 3].contiguous(),
            host=tuple(tuple(int(x) for x in r) for r in rows),
        )


def is_bool(x) -> bool:
    """A Python or numpy bool (numpy's is named ``bool_``, ``bool`` in numpy 2), without importing numpy."""
    return isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_"))


def is_integer(x) -> bool:
    """A Python or numpy integer, never a bool. The one integer rule of the package (LayerAttention, the
    layout builders, rhythm.config)."""
    return isinstance(x, numbers.Integral) and not is_bool(x)


def _response_starts(response_start, n: int, name_count: str) -> list[int] | None:
    """Normalise ``response_start`` (None, an int, or a 1-D integer tensor / numpy array of length n) to a list
    of ints."""
    if response_start is None:
        return None
    if is_integer(response_start):
        return [int(response_start)] * n
    if type(response_start).__module__ == "numpy" and hasattr(response_start, "dtype"):
        if response_start.dtype.kind not in "iu":
            raise TypeError(f"response_start must hold integers, got numpy dtype {response_start.dtype}")
        response_start = torch.as_tensor(response_start)
    if isinstance(response_start, torch.Tensor):
        if response_start.dtype.is_floating_point or response_start.dtype == torch.bool:
            raise TypeError(f"response_start must hold integers, got dtype {response_start.dtype}")
        if response_start.dim() == 0:
            return [int(response_start.item())] * n
        if response_start.dim() != 1 or response_start.shape[0] != n:
            raise ValueError(
                f"response_start must be an int or a 1-D tensor of length {n} ({name_count}), "
                f"got shape {tuple(response_start.shape)}"
            )
        return [int(x) for x in response_start.tolist()]
    raise TypeError(f"response_start must be None, an int or an integer tensor, got {type(response_start).__name__}")


def _check_response_starts(rows: list[tuple[int, int, int, int]]) -> None:
    for i, (_, start, end, resp) in enumerate(rows):
        if not start <= resp <= end:
            raise ValueError(
                f"response_start[{i}] = {resp} lies outside its sequence's real span [{start}, {end}] on the T "
                "axis (it is an absolute T index; the response may be empty, response_start = end)"
            )


def segments_from_mask(attention_mask: torch.Tensor | None, batch: int, length: int, response_start,
                       device: torch.device) -> Segments:
    """Segments of a padded batch: one per row, its real tokens one contiguous span.

    attention_mask: [B, T] bool/int (1 on real tokens) or None (every position real).
    """
    if attention_mask is None:
        spans = [(0, length)] * batch
    else:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must have shape [B, T] = [{batch}, {length}], got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype != torch.bool and not torch.all((attention_mask == 0) | (attention_mask == 1)):
            raise ValueError("attention_mask must hold only 0/1 (or bool) values")
        real = attention_mask.bool().cpu()
        counts = real.sum(dim=1)
        positions = torch.arange(length)
        first = torch.where(real, positions, length).amin(dim=1)
        last = torch.where(real, positions, -1).amax(dim=1)
        spans = []
        for b in range(batch):
            n, a, z = int(counts[b]), int(first[b]), int(last[b])
            if n == 0:
                raise ValueError(f"attention_mask row {b} has no real token (an empty row is not a sequence)")
            if z - a + 1 != n:
                raise ValueError(
                    f"attention_mask row {b} is not one contiguous span of real tokens (real tokens from {a} "
                    f"to {z} with {z - a + 1 - n} padding positions inside); only left/right padding is allowed"
                )
            spans.append((a, z + 1))
    starts = _response_starts(response_start, batch, "one per batch row")
    rows = [(b, a, e, a if starts is None else starts[b]) for b, (a, e) in enumerate(spans)]
    _check_response_starts(rows)
    return Segments.from_host(rows, device)


def segments_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int, response_start,
                             device: torch.device) -> Segments:
    """Segments of a packed varlen batch (B = 1): segment i covers [cu_seqlens[i], cu_seqlens[i + 1])."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an integer tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must hold integers, got dtype {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens describes a packed batch: q must have B = 1, got B = {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != length:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {length}, got {bounds[0]} .. {bounds[-1]}")
    if any(b >= a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty segment), got {bounds}")
    n = len(bounds) - 1
    starts = _response_starts(response_start, n, "one per segment")
    rows = [(0, bounds[i], bounds[i + 1], bounds[i] if starts is None else starts[i]) for i in range(n)]
    _check_response_starts(rows)
    return Segments.from_host(rows, device)


def position_table(segments: Segments, batch: int, length: int) -> dict[str, torch.Tensor]:
    """Per-position view of the segments: int64 [B, T] tensors start, end, response_start and bool real.

    Padding positions get start = end = response_start = 0 and real = False.
    """
    device = segments.start.device
    table = {name: torch.zeros(batch, length, dtype=torch.int64, device=device)
             for name in ("start", "end", "response_start")}
    real = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for i, (b, a, e, r) in enumerate(segments.host):
        table["start"][b, a:e] = a
        table["end"][b, a:e] = e
        table["response_start"][b, a:e] = r
        real[b, a:e] = True
    table["real"] = real
    return table


def influence_counts(segments: Segments, batch: int, length: int, horizon: Horizon) -> torch.Tensor:
    """|T(s)| for every key position s: int64 [B, T] (0 on padding).

    T(s) = { t in [response_start, end) : s + H_lo <= t <= min(end - 1, s + H_hi) }   (docs/definitions.md section 2)
    """
    h_lo, h_hi = horizon
    table = position_table(segments, batch, length)
    s = torch.arange(length, device=table["end"].device).expand(batch, length)
    first = torch.maximum(s + h_lo, table["response_start"])
    last = table["end"] - 1 if h_hi is None else torch.minimum(table["end"] - 1, s + h_hi)
    counts = (last - first + 1).clamp_min(0)
    return torch.where(table["real"], counts, torch.zeros_like(counts))
