"""The blocked pure-torch backend: the algorithm of the Triton kernels, one query block at a time.

For each sequence and each query block [t0, t1) it holds one block row of scores, S = scale * q k^T over
the keys [0, t1) (causal: no key beyond the block), and never more. Per block row:

    m = max_s S,  P = exp(S - m),  l = sum_s P,  lse = m + log l,  A = P / l
    distance[t] = (t - t0) + sum_s A[t,s] (t0 - s)          exact: no large t minus a large mean
    waad[t]     = W - sum_{t-W < s <= t} A[t,s] (W - (t - s))   (W-band identity, docs/definitions.md 2)
    fai_sum[s] += sum_{t in block, t in R, H_lo <= t-s <= H_hi} A[t,s]   (only the horizon band's columns)
    out[t]      = sum_s A[t,s] v_s                            (only when v is given)

Unlike the Triton stats pass, which streams key blocks with an online (rescaled) log-sum-exp, a block row
here spans every key of the block at once, so its softmax statistics come in one shot; the working memory
stays bounded because the query block shrinks as T grows (the block row is at most BLOCK_ROW_ELEMENTS, one
workspace reused by every block of a sequence). On CPU this is faster than a key loop, whose per-chunk
rescaling would be extra passes over the same scores.

GQA: the query heads of one key head are stacked along the rows of a single matmul, so K and V are never
repeated. Inputs in fp16/bf16 are upcast block by block; every sum runs in fp32. Sums run in a fixed order
(no atomics): two calls give bitwise-equal results.
"""
from __future__ import annotations

import functools

import torch

from .segments import Horizon, Segments

# Largest block row of scores kept at once, in fp32 elements (16 MiB): bounds the backend's working memory.
BLOCK_ROW_ELEMENTS = 1 << 22
MIN_BLOCK, MAX_BLOCK = 16, 256


def query_block_size(q_heads: int, length: int, budget: int | None = None) -> int:
    """The largest power-of-two query block whose block row (q_heads x block x length) fits the budget."""
    budget = BLOCK_ROW_ELEMENTS if budget is None else budget
    block = MAX_BLOCK
    while block > MIN_BLOCK and q_heads * block * length > budget:
        block //= 2
    return block


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
def _horizon_keep(offset: int, rows: int, cols: int, horizon: Horizon, device: torch.device) -> torch.Tensor:
    """float32 [rows, cols]: 1 where H_lo <= t - s <= H_hi, else 0."""
    lag = _lag(offset, rows, cols, device)
    keep = lag >= horizon[0]
    if horizon[1] is not None:
        keep &= lag <= horizon[1]
    return keep.to(torch.float32)


def _band_column_sums(attn_rows: torch.Tensor, probs: torch.Tensor, t0: int, t1: int, horizon: Horizon):
    """sum over rows t of the block of A[t, s] for H_lo <= t - s <= H_hi, per key column s.

    attn_rows [Hq, 1, bq]: 1/l on response rows, 0 elsewhere (so the row sum of P weighted by it is A's).
    probs [Hq, bq, t1]: unnormalised P of the block row. Returns (first key, column sums [Hq, width]).
    Keys that every row of the block counts go through one unmasked matrix-vector product; only the two
    ragged edges of the band are masked.
    """
    h_lo, h_hi = horizon
    key_lo = 0 if h_hi is None else max(0, t0 - h_hi)
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
        part = probs[:, :, lo:hi] * keep
        sums[:, lo - key_lo:hi - key_lo] = torch.matmul(attn_rows, part).squeeze(1)

    if full_lo < full_hi:
        sums[:, full_lo - key_lo:full_hi - key_lo] = torch.matmul(attn_rows, probs[:, :, full_lo:full_hi]).squeeze(1)
        masked(key_lo, full_lo)
        masked(full_hi, key_hi)
    else:
        masked(key_lo, key_hi)
    return key_lo, sums


def _segment_metrics(q, k, v, response_offset: int, window: int, horizon: Horizon, scale: float, block: int):
    """Metrics of one sequence. q [Hq, n, D], k/v [Hkv, n, D] (fp32). response_offset: first response row.

    Returns lse, distance, waad, fai_sum ([Hq, n] fp32) and out ([n, Hq, D] fp32 or None).
    """
    q_heads, n, dim = q.shape
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    device = q.device
    lse, distance, waad, fai_sum = (torch.zeros(q_heads, n, device=device) for _ in range(4))
    out = torch.zeros(n, q_heads, v.shape[-1], device=device) if v is not None else None
    q_grouped = (q * scale).view(kv_heads, group, n, dim)             # fold the scale into q once
    key_t = k.transpose(1, 2)                                            # [Hkv, D, n]
    key_offsets = torch.arange(n, device=device, dtype=torch.float32)
    # One workspace for every block row of this sequence: no large allocation per block.
    workspace = torch.empty(q_heads * min(block, n) * n, device=device, dtype=torch.float32)

    for t0 in range(0, n, block):
        t1 = min(n, t0 + block)
        rows = t1 - t0
        # Block row of scores: [Hkv, G * rows, t1] -> [Hq, rows, t1]; keys beyond the diagonal are masked.
        q_blk = q_grouped[:, :, t0:t1].reshape(kv_heads, group * rows, dim)
        scores = workspace[:q_heads * rows * t1].view(kv_heads, group * rows, t1)
        torch.matmul(q_blk, key_t[:, :, :t1], out=scores)
        scores = scores.view(q_heads, rows, t1)
        scores[:, :, t0:t1].masked_fill_(_future(rows, device), float("-inf"))
        # Softmax statistics: P = exp(S - m), l = sum P, lse = m + log l (P is built in place of S).
        row_max = scores.amax(dim=-1, keepdim=True)
        probs = scores.sub_(row_max).exp_()
        row_sum = probs.sum(dim=-1)                                      # [Hq, rows]
        inv_sum = row_sum.reciprocal()
        lse[:, t0:t1] = row_max.squeeze(-1) + row_sum.log()
        # distance[t] = (t - t0) + sum_s A[t,s] (t0 - s): one matrix-vector product over the block row.
        lag_from_t0 = (t0 - key_offsets[:t1])
        local = torch.arange(rows, device=device, dtype=torch.float32)
        distance[:, t0:t1] = local + torch.matmul(probs, lag_from_t0) * inv_sum
        # waad[t] = W - sum_{0 <= t-s < W} A[t,s] (W - (t - s)): only the keys of the W-band.
        band_lo = max(0, t0 - window + 1)
        band_weight = _window_weight(t0 - band_lo, rows, t1 - band_lo, window, device)
        band = (probs[:, :, band_lo:t1] * band_weight).sum(dim=-1)
        # Clamped to the invariants 0 <= waad <= min(W, distance) (docs/definitions.md section 7): for t < W
        # both are the same sum computed two ways, and rounding must not put waad above distance (the Triton
        # pass does the same).
        waad[:, t0:t1] = torch.minimum((window - band * inv_sum).clamp_(0, window), distance[:, t0:t1])
        # FAI column sums over the response rows of this block, inside the horizon band only.
        if t1 > response_offset:
            in_response = (torch.arange(t0, t1, device=device) >= response_offset).to(torch.float32)
            attn_rows = (inv_sum * in_response).unsqueeze(1)             # [Hq, 1, rows]
            key_lo, sums = _band_column_sums(attn_rows, probs, t0, t1, horizon)
            if sums is not None:
                fai_sum[:, key_lo:key_lo + sums.shape[1]] += sums
        if v is not None:
            weighted = torch.matmul(probs.view(kv_heads, group * rows, t1), v[:, :t1])
            out[t0:t1] = (weighted.view(q_heads, rows, -1) * inv_sum.unsqueeze(-1)).transpose(0, 1)
    return lse, distance, waad, fai_sum, out


def blocked_attention_metrics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, segments: Segments,
                              counts: torch.Tensor, *, window: int, horizon: Horizon, scale: float,
                              block: int | None = None) -> dict[str, torch.Tensor]:
    """Torch backend of ``rhythm.attention_metrics``.

    q [B, Hq, T, D], k/v [B, Hkv, T, D]; counts [B, T] = |T(s)| (``influence_counts``).
    Returns lse, distance, waad, fai: float32 [B, Hq, T] (0 on padding); out [B, T, Hq, D] in q.dtype
    when v is given.
    """
    batch, q_heads, length, _ = q.shape
    result = {name: torch.zeros(batch, q_heads, length, dtype=torch.float32, device=q.device)
              for name in ("lse", "distance", "waad", "fai")}
    if v is not None:
        result["out"] = torch.zeros(batch, length, q_heads, v.shape[-1], dtype=q.dtype, device=q.device)
    upcast = lambda x: x.to(torch.float32)  # noqa: E731  (a no-op for fp32 inputs)
    for b, start, end, response_start in segments.host:
        span = slice(start, end)
        size = block or query_block_size(q_heads, end - start)
        lse, distance, waad, fai_sum, out = _segment_metrics(
            upcast(q[b, :, span]), upcast(k[b, :, span]), None if v is None else upcast(v[b, :, span]),
            response_start - start, window, horizon, scale, size)
        result["lse"][b, :, span] = lse
        result["distance"][b, :, span] = distance
        result["waad"][b, :, span] = waad
        count = counts[b, span].to(torch.float32)
        result["fai"][b, :, span] = torch.where(count > 0, fai_sum / count.clamp_min(1), 0)
        if v is not None:
            result["out"][b, span] = out.to(q.dtype)
    return result
