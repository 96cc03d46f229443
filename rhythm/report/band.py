"""Exact attention probabilities on a band of diagonals, from q, k and lse (never a T x T map).

The report's pictures of the head groups (docs/definitions.md sections 2-3) need A[t, s] only near the
diagonal: the local heads' look-back over the last few dozen keys, and the global heads' horizon band
H_lo <= t - s <= H_hi whose column means are FAI. Given the row normaliser lse from the metrics pass, every
entry of such a band is one dot product:

    A[t, s] = exp(S'[t, s] - lse[t])   S' = scale * q_t . k_s (softcapped when the layer says so)

so a band of width w costs O(T * w * D) per head and O(T * w) memory.

:class:`QKCapture` is the capture that also keeps the post-RoPE q and k of the sampled layers (for the analyze
path: one short sequence).
"""
from __future__ import annotations

import torch

from rhythm.capture.recording import Capture, CaptureRequest, SampledLayer


def band_attention(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, lags: range, scale: float,
                   anchor: str = "query", layer=None) -> torch.Tensor:
    """A on the diagonals t - s in ``lags`` of one sequence.

    Args:
        q: [H, T, D] queries of H heads (post-RoPE). k: [H, T, D] the key of each of those heads (a GQA key
            head repeated or indexed for its query heads). lse: [H, T] the rows' natural-log normaliser
            (``AttentionMetrics.lse``; with attention sinks it already holds the sink term).
        lags: the lags t - s >= 0 to return, e.g. range(64) or range(H_lo, H_hi + 1).
        scale: the softmax scale. anchor: "query" -> out[h, t, j] = A[t, t - lags[j]];
            "key" -> out[h, s, j] = A[s + lags[j], s].
        layer: a LayerAttention (softcap, sliding_window, chunk_size; the sinks are already in lse) or None.
            Chunks are counted from position 0 of the sequence.
    Returns:
        float32 [H, T, len(lags)], 0 where the other end falls outside [0, T) or the key is invisible.
    """
    if anchor not in ("query", "key"):
        raise ValueError(f"anchor must be 'query' or 'key', got {anchor!r}")
    if q.dim() != 3 or k.shape != q.shape or tuple(lse.shape) != tuple(q.shape[:2]):
        raise ValueError(f"q, k must be [H, T, D] and lse [H, T], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(lse.shape)}")
    heads, length, _ = q.shape
    softcap = getattr(layer, "softcap", None)
    window = getattr(layer, "sliding_window", None)
    chunk = getattr(layer, "chunk_size", None)
    q, k, lse = q.float(), k.float(), lse.float()
    out = torch.zeros(heads, length, len(lags), dtype=torch.float32, device=q.device)
    for j, lag in enumerate(lags):
        if lag < 0:
            raise ValueError(f"lags must be >= 0, got {lag}")
        if lag >= length or (window is not None and lag >= window):
            continue
        # rows t = lag..T-1 against keys s = t - lag: S = scale * q_t . k_s, A = exp(S' - lse[t])
        scores = scale * (q[:, lag:] * k[:, : length - lag]).sum(-1)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        probs = torch.exp(scores - lse[:, lag:])
        if chunk:
            t = torch.arange(lag, length, device=q.device)
            probs = torch.where(t // chunk == (t - lag) // chunk, probs, 0.0)
        if anchor == "query":
            out[:, lag:, j] = probs
        else:
            out[:, : length - lag, j] = probs
    return out


def group_band(qk: dict, lse: dict, heads: list[tuple[int, int]], *, lags: range, anchor: str = "query",
               rows: slice | None = None, layers: dict | None = None) -> torch.Tensor:
    """Mean over ``heads`` ((layer, head) pairs) of :func:`band_attention` on sequence 0 of a capture.

    qk: layer -> (query [1, Hq, T, D], key [1, Hkv, T, D], scale) as :class:`QKCapture` keeps them.
    lse: layer -> [1, Hq, T]. rows: the query rows that count, e.g. the response rows for the FAI band.
    layers: layer -> LayerAttention (or None). Returns float32 [T, len(lags)], NaN on the cells nothing
    observes: the other end outside [0, T), or (with ``rows``) a query row that does not count.
    """
    if not heads:
        raise ValueError("group_band needs at least one (layer, head) pair (an empty response has no head groups)")
    total = None
    for layer, head in heads:
        query, key, scale = qk[layer]
        group = query.shape[1] // key.shape[1]
        band = band_attention(query[0, head][None], key[0, head // group][None], lse[layer][0, head][None],
                              lags=lags, scale=scale, anchor=anchor,
                              layer=None if layers is None else layers.get(layer))[0]
        length = band.shape[0]
        keep = torch.ones(length, dtype=torch.bool)
        if rows is not None:
            keep = torch.zeros(length, dtype=torch.bool)
            keep[rows] = True
        # the query row of each cell: t itself ("query": out[t, j] = A[t, t - lag]) or s + lag ("key")
        offset = torch.tensor(list(lags))[None, :]
        positions = torch.arange(length)[:, None]
        row_of = positions.expand(-1, len(lags)) if anchor == "query" else positions + offset
        other_end = positions - offset if anchor == "query" else row_of
        observed = (other_end >= 0) & (other_end < length) & keep[row_of.clamp(0, length - 1)]
        band = torch.where(observed, band, float("nan"))
        total = band if total is None else total + band
    return total / max(1, len(heads))


class QKCapture(Capture):
    """A :class:`rhythm.capture.recording.Capture` that also keeps the post-RoPE query and unrepeated key of every
    sampled layer, ``self.qk[layer] = (query [B, Hq, T, D], key [B, Hkv, T, D], scale)`` (detached), and the
    layer's attention description, ``self.layer_attention[layer]`` (window, chunks, softcap, sinks), through the
    capture's public ``observe`` hook."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model, observe=self._keep)
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.layer_attention: dict = {}

    def _keep(self, sampled: SampledLayer) -> None:
        self.qk[sampled.layer] = (sampled.query.detach(), sampled.key.detach(), sampled.scale)
        self.layer_attention[sampled.layer] = sampled.attention


def capture_qk(model, scorer, ids: list[int], prompt_length: int, *, stop_after_last: bool = True):
    """One pass over one sequence (prompt + response token ids) recording the scorer's sampled layers with a
    :class:`QKCapture`: (records {layer: AttentionMetrics}, qk {layer: (query, key, scale)} on the CPU,
    {layer: LayerAttention}, the forward's output). stop_after_last=False lets the model finish, and the
    output then holds its logits; otherwise it is None."""
    device = scorer.device
    length = len(ids)
    config = scorer.config
    request = CaptureRequest(layers=tuple(scorer.layers), response_start=torch.tensor([prompt_length], device=device),
                             window=config.window, horizon=tuple(config.horizon), backend=config.backend,
                             stop_after_last=stop_after_last)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), QKCapture(model) as capture:
            result = capture.run(request, input_ids=torch.tensor([ids], device=device),
                                  position_ids=torch.arange(length, device=device)[None])
            qk = {layer: tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in capture.qk[layer])
                  for layer in scorer.layers}
            layers = dict(capture.layer_attention)
    finally:
        model.train(was_training)
    return result.records, qk, layers, result.output
