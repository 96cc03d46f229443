"""The blocked pure-torch backend: the algorithm of the Triton kernels, one query block at a time.

For each sequence and each query block [t0, t1) it holds one block row of scores, S = scale * q k^T over
the keys the block can see, [k0, t1) (causal: no key beyond the block; with a sliding window w,
k0 = t0 - w + 1; with chunks, k0 = the start of t0's chunk), and never more. Invisible keys inside the block
row (the ragged window edge, an earlier chunk, the future) get S = -inf. Per block row:

    S' = softcap * tanh(S / softcap)                                 (only with a softcap)
    m = max(max_s S', sink),  P = exp(S' - m),  l = sum_s P + exp(sink - m),  lse = m + log l,  A = P / l
    mass[t]     = sum_s A[t,s]                                 (1 without sinks: no exp(sink) term in l)
    distance[t] = (t - t0) mass[t] + sum_s A[t,s] (t0 - s)      exact: no large t minus a large mean
    waad[t]     = W mass[t] - sum_{t-W < s <= t} A[t,s] (W - (t - s))     W <= 64 (the W-band identity)
                = W sum_{t-s >= W} A[t,s] + sum_{t-s < W} A[t,s] (t - s)   W > 64, both parts summed directly
    fai_sum[s] += sum_{t in block, t in R, H_lo <= t-s <= H_hi} A[t,s]   (only the horizon band's columns)
    out[t]      = sum_s A[t,s] v_s                            (only when v is given)

The W-band identity rounds to about W * eps; for a large W it cancels in fp32 (W = 1000 misses 1e-4, W = 1e9
leaves nothing of the result), so beyond W = 64 WAAD is summed term by term, every term >= 0.

Unlike the Triton stats pass, which streams key blocks with an online (rescaled) log-sum-exp, a block row
here spans every key of the block at once, so its softmax statistics come in one shot; the working memory
stays bounded because the query block shrinks as the visible key span grows (the block row is at most
BLOCK_ROW_ELEMENTS, one workspace reused by every block of a sequence). On CPU this is faster than a key
loop, whose per-chunk rescaling would be extra passes over the same scores.

GQA: the query heads of one key head are stacked along the rows of a single matmul, so K and V are never
repeated. Inputs in fp16/bf16 are upcast block by block; every sum runs in fp32. Sums run in a fixed order
(no atomics): two calls give bitwise-equal results.
"""
from __future__ import annotations

import functools

import torch

from .layer_attention import LayerAttention
from .segments import Horizon, Segments

# Largest block row of scores kept at once, in fp32 elements (16 MiB): bounds the backend's working memory.
BLOCK_ROW_ELEMENTS = 1 << 22
MIN_BLOCK, MAX_BLOCK = 16, 256
# Up to this W, WAAD uses the W-band identity (rounding about W * eps, well inside 1e-4); beyond it the
# identity cancels (W = 1000 already misses 1e-4 in fp32) and WAAD is summed directly.
BAND_IDENTITY_MAX_WINDOW = 64


def key_span(layer: LayerAttention | None) -> int | None:
    """The most keys one row can see under the layer's window / chunk (None: no bound but causality)."""
    if layer is None:
        return None
    bounds = [x for x in (layer.sliding_window, layer.chunk_size) if x is not None]
    return min(bounds) if bounds else None


def query_block_size(q_heads: int, length: int, budget: int | None = None, span: int | None = None) -> int:
    """The largest power-of-two query block whose block row (q_heads x block x keys) fits the budget.

    A block row holds at most ``length`` keys, and at most span + block - 1 when each row sees at most
    ``span`` keys (window / chunk)."""
    budget = BLOCK_ROW_ELEMENTS if budget is None else budget
    block = MAX_BLOCK
    while block > MIN_BLOCK and q_heads * block * _row_width(length, span, block) > budget:
        block //= 2
    return block


def _row_width(length: int, span: int | None, block: int) -> int:
    return length if span is None else min(length, span + block - 1)


@functools.lru_cache(maxsize=512)
def _lag(offset: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """lag[i, j] = offset + i - j: the t - s of row t0 + i and key s0 + j when offset = t0 - s0.

    int64 [rows, cols]. Interior blocks share the same few shapes, so the masks built from it are cached
    (callers never write into the returned tensors)."""
    return offset + torch.arange(rows, device=device)[:, None] - torch.arange(cols, device=device)[None, :]


@functools.lru_cache(maxsize=512)
def _future(rows: int, device: torch.device) -> torch.Tensor:
    """bool [rows, rows]: True where the key lies after the query (s > t) on the diagonal block."""
    return _lag(0, rows, rows, device) < 0


@functools.lru_cache(maxsize=512)
def _window_weight(offset: int, rows: int, cols: int, window: int, device: torch.device) -> torch.Tensor:
    """float32 [rows, cols]: W - (t - s) inside the W-band (0 <= t - s < W), 0 further back.

    Keys past the diagonal get weight W, but their P is exactly 0."""
    return (window - _lag(offset, rows, cols, device)).clamp_(0, window).to(torch.float32)


@functools.lru_cache(maxsize=512)
def _clipped_lag(offset: int, rows: int, cols: int, window: int, device: torch.device) -> torch.Tensor:
    """float32 [rows, cols]: min(t - s, W), and 0 for keys past the diagonal (whose P is 0 anyway)."""
    return _lag(offset, rows, cols, device).clamp(0, window).to(torch.float32)


@functools.lru_cache(maxsize=512)
def _horizon_keep(offset: int, rows: int, cols: int, horizon: Horizon, device: torch.device) -> torch.Tensor:
    """float32 [rows, cols]: 1 where H_lo <= t - s <= H_hi, else 0."""
    lag = _lag(offset, rows, cols, device)
    keep = lag >= horizon[0]
    if horizon[1] is not None:
        keep &= lag <= horizon[1]
    return keep.to(torch.float32)


def _first_visible_keys(t0: int, t1: int, layer: LayerAttention | None, device) -> torch.Tensor | None:
    """int64 [rows]: the first key each row t in [t0, t1) sees (positions within the segment), or None
    when every row sees from key 0 (plain causal).

    first(t) = max(t - w + 1, start of t's chunk, 0); it never decreases with t."""
    if layer is None or (layer.sliding_window is None and layer.chunk_size is None):
        return None
    rows = torch.arange(t0, t1, device=device)
    first = torch.zeros_like(rows)
    if layer.sliding_window is not None:
        first = (rows - layer.sliding_window + 1).clamp_min(0)
    if layer.chunk_size is not None:
        first = torch.maximum(first, rows - rows % layer.chunk_size)
    return first


def _key_range(t0: int, t1: int, layer: LayerAttention | None) -> tuple[int, int]:
    """(k0, k_ragged): the first key any row of [t0, t1) sees, and the first key every row sees (host ints,
    the same rule as ``_first_visible_keys`` for its first and last row)."""
    def first(t: int) -> int:
        lo = 0
        if layer is not None and layer.sliding_window is not None:
            lo = max(lo, t - layer.sliding_window + 1)
        if layer is not None and layer.chunk_size is not None:
            lo = max(lo, t - t % layer.chunk_size)
        return lo
    return first(t0), first(t1 - 1)


def _band_column_sums(attn_rows: torch.Tensor, probs: torch.Tensor, t0: int, t1: int, k0: int, horizon: Horizon):
    """sum over rows t of the block of A[t, s] for H_lo <= t - s <= H_hi, per key column s.

    attn_rows [Hq, 1, bq]: 1/l on response rows, 0 elsewhere (so the row sum of P weighted by it is A's).
    probs [Hq, bq, t1 - k0]: unnormalised P of the block row over keys [k0, t1) (0 on invisible keys).
    Returns (first key, column sums [Hq, width]). Keys before k0 are invisible to every row of the block:
    they get nothing. Keys that every row counts go through one unmasked matrix-vector product; only the two
    ragged edges of the band are masked.
    """
    h_lo, h_hi = horizon
    key_lo = k0 if h_hi is None else max(k0, t0 - h_hi)
    key_hi = t1 - h_lo                                  # exclusive: s <= t1 - 1 - H_lo
    if key_hi <= key_lo:
        return key_lo, None
    full_lo = key_lo if h_hi is None else max(key_lo, t1 - 1 - h_hi)
    full_hi = min(key_hi, t0 - h_lo + 1)                 # keys with t - s >= H_lo for every row t >= t0
    sums = torch.zeros(probs.shape[0], key_hi - key_lo, dtype=probs.dtype, device=probs.device)

    def masked(lo: int, hi: int) -> None:
        if hi <= lo:
            return
        keep = _horizon_keep(t0 - lo, t1 - t0, hi - lo, horizon, probs.device)
        part = probs[:, :, lo - k0:hi - k0] * keep
        sums[:, lo - key_lo:hi - key_lo] = torch.matmul(attn_rows, part).squeeze(1)

    if full_lo < full_hi:
        sums[:, full_lo - key_lo:full_hi - key_lo] = torch.matmul(
            attn_rows, probs[:, :, full_lo - k0:full_hi - k0]).squeeze(1)
        masked(key_lo, full_lo)
        masked(full_hi, key_hi)
    else:
        masked(key_lo, key_hi)
    return key_lo, sums


def _segment_metrics(q, k, v, response_offset: int, window: int, horizon: Horizon, scale: float, block: int,
                     layer: LayerAttention | None = None, sinks: torch.Tensor | None = None):
    """Metrics of one sequence. q [Hq, n, D], k [Hkv, n, D], v [Hkv, n, Dv] (fp32). response_offset: first response row.
    layer: window / chunk / softcap of the layer (None = plain causal); sinks: fp32 [Hq] or None.

    Returns lse, distance, waad, fai_sum ([Hq, n] fp32) and out ([n, Hq, Dv] fp32 or None).
    """
    q_heads, n, dim = q.shape
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    device = q.device
    softcap = None if layer is None else layer.softcap
    lse, distance, waad, fai_sum = (torch.zeros(q_heads, n, device=device) for _ in range(4))
    out = torch.zeros(n, q_heads, v.shape[-1], device=device) if v is not None else None
    q_grouped = (q * scale).view(kv_heads, group, n, dim)             # fold the scale into q once
    key_t = k.transpose(1, 2)                                            # [Hkv, D, n]
    key_offsets = torch.arange(n, device=device, dtype=torch.float32)
    sink_logits = None if sinks is None else sinks.view(q_heads, 1, 1)
    # One workspace for every block row of this sequence: no large allocation per block.
    width_max = _row_width(n, key_span(layer), min(block, n))
    workspace = torch.empty(q_heads * min(block, n) * width_max, device=device, dtype=torch.float32)

    for t0 in range(0, n, block):
        t1 = min(n, t0 + block)
        rows = t1 - t0
        k0, k_ragged = _key_range(t0, t1, layer)                          # keys [k0, t1) hold every visible one
        width = t1 - k0
        # Block row of scores: [Hkv, G * rows, width] -> [Hq, rows, width].
        q_blk = q_grouped[:, :, t0:t1].reshape(kv_heads, group * rows, dim)
        scores = workspace[:q_heads * rows * width].view(kv_heads, group * rows, width)
        torch.matmul(q_blk, key_t[:, :, k0:t1], out=scores)
        scores = scores.view(q_heads, rows, width)
        if softcap is not None:                                          # S' = cap * tanh(S / cap)
            scores.div_(softcap).tanh_().mul_(softcap)
        # Invisible keys: beyond the diagonal, and before each row's first visible key (window / chunk edge).
        scores[:, :, t0 - k0:].masked_fill_(_future(rows, device), float("-inf"))
        if k_ragged > k0:
            first = _first_visible_keys(t0, t1, layer, device)
            before = torch.arange(k0, k_ragged, device=device)[None, :] < first[:, None]
            scores[:, :, :k_ragged - k0].masked_fill_(before, float("-inf"))
        # Softmax statistics: m = max(S', sink), P = exp(S' - m), l = sum P (+ exp(sink - m)), lse = m + log l.
        row_max = scores.amax(dim=-1, keepdim=True)                      # finite: every row sees itself
        if sink_logits is not None:
            row_max = torch.maximum(row_max, sink_logits)
        probs = scores.sub_(row_max).exp_()                              # P is built in place of S
        key_sum = probs.sum(dim=-1)                                      # [Hq, rows]
        norm = key_sum if sink_logits is None else key_sum + torch.exp(sink_logits - row_max).squeeze(-1)
        inv_norm = norm.reciprocal()
        lse[:, t0:t1] = row_max.squeeze(-1) + norm.log()
        # distance[t] = (t - t0) mass[t] + sum_s A[t,s] (t0 - s), mass = sum_s A[t,s] (1 without sinks):
        # one matrix-vector product over the block row.
        lag_from_t0 = t0 - key_offsets[k0:t1]
        local = torch.arange(rows, device=device, dtype=torch.float32)
        local_mass = local if sink_logits is None else local * key_sum * inv_norm
        distance[:, t0:t1] = local_mass + torch.matmul(probs, lag_from_t0) * inv_norm
        # waad[t] = sum_s A[t,s] min(t - s, W), in one of two exact forms:
        if window <= BAND_IDENTITY_MAX_WINDOW:
            # W-band identity, W mass[t] - sum_{0 <= t-s < W} A[t,s] (W - (t - s)), mass = sum_s A[t,s] (1
            # without sinks): only the W keys next to the diagonal; its rounding is about W * eps.
            band_lo = max(t0 - window + 1, k0)
            band_weight = _window_weight(t0 - band_lo, rows, t1 - band_lo, window, device)
            band = (probs[:, :, band_lo - k0:] * band_weight).sum(dim=-1)
            if sink_logits is None:
                waad_rows = window - band * inv_norm
            else:
                waad_rows = (window * key_sum - band) * inv_norm
        else:
            # Large W (the identity would cancel: W = 1e9 leaves nothing): (W sum_{t-s >= W} P
            # + sum_{t-s < W} P (t - s)) / l with every term >= 0, over three key ranges:
            #   far    [k0, far_hi):      t - s >= W for every row of the block   -> W * sum P
            #   ragged [far_hi, near_lo): depends on the row                      -> sum P min(t - s, W)
            #   near   [near_lo, t1):     t - s < W for every row                 -> like distance
            # With W >= the key span the near range is the whole row: the distance sum, bit for bit.
            far_hi = min(max(t0 - window + 1, k0), t1)
            near_lo = min(max(t1 - window, far_hi), t1)
            near = probs[:, :, near_lo - k0:]
            # near: (t - t0) sum_near A + sum_near A (t0 - s), written as distance is when it spans the row
            near_mass = local_mass if near_lo == k0 else local * near.sum(dim=-1) * inv_norm
            waad_rows = near_mass + torch.matmul(near, lag_from_t0[near_lo - k0:]) * inv_norm
            if near_lo > far_hi:
                clipped = _clipped_lag(t0 - far_hi, rows, near_lo - far_hi, window, device)
                waad_rows += (probs[:, :, far_hi - k0:near_lo - k0] * clipped).sum(dim=-1) * inv_norm
            if far_hi > k0:
                waad_rows += window * probs[:, :, :far_hi - k0].sum(dim=-1) * inv_norm
        # Clamped to the invariants 0 <= waad <= min(W, distance) (docs/definitions.md section 7): when W covers
        # the keys the two are the same sum, and rounding must never put waad above distance.
        waad[:, t0:t1] = torch.minimum(waad_rows.clamp_(0, window), distance[:, t0:t1])
        # FAI column sums over the response rows of this block, inside the horizon band only.
        if t1 > response_offset:
            in_response = (torch.arange(t0, t1, device=device) >= response_offset).to(torch.float32)
            attn_rows = (inv_norm * in_response).unsqueeze(1)            # [Hq, 1, rows]
            key_lo, sums = _band_column_sums(attn_rows, probs, t0, t1, k0, horizon)
            if sums is not None:
                fai_sum[:, key_lo:key_lo + sums.shape[1]] += sums
        if v is not None:
            weighted = torch.matmul(probs.view(kv_heads, group * rows, width), v[:, k0:t1])
            out[t0:t1] = (weighted.view(q_heads, rows, -1) * inv_norm.unsqueeze(-1)).transpose(0, 1)
    return lse, distance, waad, fai_sum, out


def blocked_attention_metrics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, segments: Segments,
                              counts: torch.Tensor, *, window: int, horizon: Horizon, scale: float,
                              block: int | None = None, layer: LayerAttention | None = None
                              ) -> dict[str, torch.Tensor]:
    """Torch backend of ``rhythm.attention_metrics``.

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] (Dv may differ from D); counts [B, T] = |T(s)|
    (``influence_counts``).
    layer: the layer's sliding window / chunks / softcap / sinks [Hq] (None = plain causal); only visible
    keys are visited (O(T * w) scores with a window w).
    Returns lse, distance, waad, fai: float32 [B, Hq, T] (0 on padding); out [B, T, Hq, Dv] in q.dtype
    when v is given. Forward only: inputs are read detached.
    """
    batch, q_heads, length, _ = q.shape
    result = {name: torch.zeros(batch, q_heads, length, dtype=torch.float32, device=q.device)
              for name in ("lse", "distance", "waad", "fai")}
    if v is not None:
        result["out"] = torch.zeros(batch, length, q_heads, v.shape[-1], dtype=q.dtype, device=q.device)
    if layer is not None and layer.is_plain:
        layer = None
    sinks = None if layer is None or layer.sinks is None else layer.sinks.detach().to(torch.float32)
    upcast = lambda x: x.detach().to(torch.float32)  # noqa: E731  (a no-op for fp32 inputs)
    for seg in segments.spans:
        b, start, end, response_start = seg.row, seg.start, seg.end, seg.response_start
        span = slice(start, end)
        size = block or query_block_size(q_heads, end - start, span=key_span(layer))
        lse, distance, waad, fai_sum, out = _segment_metrics(
            upcast(q[b, :, span]), upcast(k[b, :, span]), None if v is None else upcast(v[b, :, span]),
            response_start - start, window, horizon, scale, size, layer, sinks)
        result["lse"][b, :, span] = lse
        result["distance"][b, :, span] = distance
        result["waad"][b, :, span] = waad
        count = counts[b, span].to(torch.float32)
        result["fai"][b, :, span] = torch.where(count > 0, fai_sum / count.clamp_min(1), 0)
        if v is not None:
            result["out"][b, span] = out.to(q.dtype)
    return result
