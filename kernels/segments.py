"""One description of where sequences live on the T axis, shared by every backend and every adapter.

A padded batch (left and/or right padding, ``attention_mask [B, T]``) and a packed varlen batch
(``B = 1`` with ``cu_seqlens``) both reduce to a list of :class:`Span`\\ s, one per sequence: its batch row,
the first real position ``start``, one past the last real position ``end`` and the first response position
``response_start`` (``start <= response_start <= end``), all absolute on the T axis. :class:`Segments` holds
them with the layout's shape and converts per-sequence *rows* (each sequence left-aligned, ``[n_seq, L_max]``)
to and from that layout; :func:`to_response_tensor` maps the trainer layout (prompt left-padded + response
right-padded) to the trainer's response tensors ``[B, R_len]``.

Inside a segment the attention is causal and never crosses the segment's boundaries.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

Horizon = tuple[int, int | None]


class Span(NamedTuple):
    """One sequence of a layout: batch ``row``, real positions [start, end), response [response_start, end)."""

    row: int
    start: int
    end: int
    response_start: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def response_length(self) -> int:
        return self.end - self.response_start

    @property
    def prompt_length(self) -> int:
        return self.response_start - self.start


@dataclass(frozen=True)
class Segments:
    """The sequences of one layout of shape ``shape = (B, T)``: per-sequence boundaries as int64 [S] tensors on
    the device of the inputs, and the same numbers as :class:`Span`\\ s in ``spans`` (Python ints) for the host-side
    loops of the torch backend, launch-grid sizing and the layout conversions, without another device
    synchronisation. ``packed``: more sequences than batch rows (B = 1 holding several)."""

    batch: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    response_start: torch.Tensor
    spans: tuple[Span, ...]
    shape: tuple[int, int]

    @property
    def count(self) -> int:
        return len(self.spans)

    @property
    def max_len(self) -> int:
        return max((span.length for span in self.spans), default=0)

    @property
    def packed(self) -> bool:
        return self.count != self.shape[0]

    @classmethod
    def from_spans(cls, spans, shape, device: torch.device | str = "cpu") -> "Segments":
        """spans: (row, start, end, response_start) per sequence; shape: (B, T) of the layout."""
        spans = tuple(Span(*(int(x) for x in span)) for span in spans)
        table = torch.tensor(spans, dtype=torch.int64).reshape(-1, 4).to(device)
        return cls(batch=table[:, 0].contiguous(), start=table[:, 1].contiguous(), end=table[:, 2].contiguous(),
                   response_start=table[:, 3].contiguous(), spans=spans, shape=(int(shape[0]), int(shape[1])))

    def to(self, device) -> "Segments":
        """The same segments with their tensors on ``device``."""
        if self.start.device == torch.device(device):
            return self
        return Segments.from_spans(self.spans, self.shape, device)

    # -- rows <-> the layout ---------------------------------------------------------------------------------
    def to_rows(self, x: torch.Tensor, *, fill=0) -> torch.Tensor:
        """x [B, ..., T] in this layout -> [n_seq, ..., L_max]: each sequence's positions, left-aligned,
        ``fill`` after its end."""
        out = torch.full((self.count, *x.shape[1:-1], self.max_len), fill, dtype=x.dtype, device=x.device)
        for i, span in enumerate(self.spans):
            out[i, ..., : span.length] = x[span.row, ..., span.start:span.end]
        return out

    def from_rows(self, rows: torch.Tensor, *, fill=0) -> torch.Tensor:
        """Inverse of :meth:`to_rows`: rows [n_seq, ..., L >= L_max] -> [B, ..., T], ``fill`` off the sequences."""
        out = torch.full((self.shape[0], *rows.shape[1:-1], self.shape[1]), fill, dtype=rows.dtype,
                         device=rows.device)
        for i, span in enumerate(self.spans):
            out[span.row, ..., span.start:span.end] = rows[i, ..., : span.length]
        return out

    def response_rows(self) -> torch.Tensor:
        """bool [n_seq, L_max] on the CPU: True on each sequence's response positions (rows left-aligned)."""
        cols = torch.arange(self.max_len)
        first = torch.tensor([span.prompt_length for span in self.spans])
        last = torch.tensor([span.length for span in self.spans])
        return (cols[None, :] >= first[:, None]) & (cols[None, :] < last[:, None])

    def with_response(self, response_mask: torch.Tensor) -> "Segments":
        """The same sequences with ``response_start`` read off ``response_mask`` (bool [B, T] on the CPU, True on
        a suffix of each sequence's real span, possibly empty); refuses a mask that marks padding or is not a
        suffix."""
        counts = [int(response_mask[span.row, span.start:span.end].sum()) for span in self.spans]
        if sum(counts) != int(response_mask.sum()):
            raise ValueError("response_mask marks padding positions; it must be a suffix of each sequence's real "
                             "span")
        spans = []
        for i, (span, n_resp) in enumerate(zip(self.spans, counts)):
            first = span.end - n_resp
            if n_resp and not bool(response_mask[span.row, first:span.end].all()):
                what = f"packed sequence {i} (positions {span.start}..{span.end - 1})" if self.packed \
                    else f"row {span.row}"
                raise ValueError(f"response_mask of {what} is not a suffix of its real span [{span.start}, "
                                 f"{span.end}): the response must be the last tokens of each sequence (prompt "
                                 "first, then response)")
            spans.append(span._replace(response_start=first))
        return Segments.from_spans(spans, self.shape, self.start.device)


# Value ranges shared by every check of a window / chunk / horizon (int) and of a scale / softcap (float):
# positions are int64 (t - s + w must not overflow), and the kernels compute in float32 (a softcap or scale
# outside float32's normal range would become 0 or inf there).
INDEX_LIMIT = 2 ** 62
FLOAT32_TINY = 2.0 ** -126
FLOAT32_MAX = 3.4028234663852886e38


def is_bool(x) -> bool:
    """A Python or numpy bool (numpy's is named ``bool_``, ``bool`` in numpy 2), without importing numpy."""
    return isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_"))


def is_integer(x) -> bool:
    """A Python or numpy integer, never a bool. The one integer rule of the package (LayerAttention, the
    layout builders, rhythm.config, the capture, the command line's rows and settings)."""
    return isinstance(x, numbers.Integral) and not is_bool(x)


def is_real(x) -> bool:
    """A Python or numpy real number (an integer or a float, NaN and infinities included), never a bool: the
    number rule beside :func:`is_integer` (callers check finiteness and range themselves)."""
    return isinstance(x, numbers.Real) and not is_bool(x)


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


def _check_response_starts(spans: list[Span]) -> None:
    for i, span in enumerate(spans):
        if not span.start <= span.response_start <= span.end:
            raise ValueError(
                f"response_start[{i}] = {span.response_start} lies outside its sequence's real span "
                f"[{span.start}, {span.end}] on the T "
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
    spans = [Span(b, a, e, a if starts is None else starts[b]) for b, (a, e) in enumerate(spans)]
    _check_response_starts(spans)
    return Segments.from_spans(spans, (batch, length), device)


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
    spans = [Span(0, bounds[i], bounds[i + 1], bounds[i] if starts is None else starts[i]) for i in range(n)]
    _check_response_starts(spans)
    return Segments.from_spans(spans, (batch, length), device)


def position_table(segments: Segments, batch: int, length: int) -> dict[str, torch.Tensor]:
    """Per-position view of the segments: int64 [B, T] tensors start, end, response_start and bool real.

    Padding positions get start = end = response_start = 0 and real = False.
    """
    device = segments.start.device
    table = {name: torch.zeros(batch, length, dtype=torch.int64, device=device)
             for name in ("start", "end", "response_start")}
    real = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for span in segments.spans:
        where = (span.row, slice(span.start, span.end))
        table["start"][where] = span.start
        table["end"][where] = span.end
        table["response_start"][where] = span.response_start
        real[where] = True
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


# ---- the trainer layout: input_ids = prompt (left-padded) + response (right-padded) ------------------------

def trainer_response_mask(attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """response_mask bool [B, T] of a trainer batch ``input_ids = prompt (left-padded) + response
    (right-padded)`` whose response tensors have width ``response_length`` = R_len: the real positions of the
    response window [T - R_len, T) (verl's and TRL's response = the right-padded tail of ``input_ids``).

    attention_mask: [B, T] bool/0-1 (1 on real tokens)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a [B, T] tensor, got {type(attention_mask).__name__} "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    length = attention_mask.shape[1]
    if not is_integer(response_length) or not 0 <= response_length <= length:
        raise ValueError(f"response_length must be an int in [0, T = {length}], got {response_length!r}")
    cols = torch.arange(length, device=attention_mask.device)
    return attention_mask.bool() & (cols >= length - int(response_length))[None, :]


def to_response_tensor(x: torch.Tensor, response_length: int, response_mask: torch.Tensor | None = None,
                       fill=None) -> torch.Tensor:
    """Map a tensor [B, T] of the trainer layout to the trainer's response tensor [B, R_len]
    (docs/definitions.md section 6).

    The trainer's response tensors cover positions [T - R_len, T) of ``prompt (left-padded) + response
    (right-padded)``; entry i multiplies the advantage of response token i, the token *at* position
    T - R_len + i (no shift: unlike log-probs, which are sliced [-R_len-1:-1] of the logits because logits
    predict the next token, the metrics are defined on the token's own position).

    response_mask [B, T] (optional): checked to lie inside the window, so nothing is silently dropped.
    fill: value written where the trainer's response is padding (None = keep x's value there).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [B, T], got shape {tuple(x.shape)}")
    length = x.shape[1]
    if not is_integer(response_length) or not 0 <= response_length <= length:
        raise ValueError(f"response_length must be an int in [0, T = {length}], got {response_length!r}")
    first = length - int(response_length)
    out = x[:, first:]
    if response_mask is not None:
        if tuple(response_mask.shape) != tuple(x.shape):
            raise ValueError(f"response_mask must have shape {tuple(x.shape)}, got {tuple(response_mask.shape)}")
        if bool(response_mask[:, :first].any()):
            raise ValueError(f"response_mask marks positions before T - response_length = {first}: "
                             "the response tensors would miss them (is the prompt left-padded and the response "
                             "right-padded?)")
        if fill is not None:
            out = torch.where(response_mask[:, first:].bool(), out,
                              torch.as_tensor(fill, dtype=out.dtype, device=out.device))
    return out
