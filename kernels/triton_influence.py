"""Influence pass: Future Attention Influence, column-parallel (FlashAttention backward dK/dV shape).

    fai[s] = (1 / |T(s)|) * sum_{t in T(s)} A[t,s],
    T(s)   = { t : response_start <= t < seg_end, s + H_lo <= t <= s + H_hi }       (docs/definitions.md section 2)

One program per (key block [n0, n0 + BLOCK_N) of a segment, KV head). The K tile stays in registers; the
program loops over the query heads of the GQA group (query head h reads kv head h // group) and, per head,
over the query rows that can attend the block (SPLIT_HEADS = True instead gives each query head its own
program, same K tile: G times more programs for short or few sequences; autotuned):

    t in [t_lo, t_end),  t_lo = max(n0 + H_lo, response_start),
                         t_end = min(seg_end, n0 + BLOCK_N + H_hi)   (seg_end when H_hi is None)

It recomputes A[t,s] = 2^((S2[t,s] - m[t]) - log2 l[t]) from the stats pass's two parts of the normaliser
(``StatsResult.norm``; S2 = scale * log2(e) * q.k, for fp32 inputs bitwise the stats pass's S2: same
prescaled q, same products in the same order) on the transposed tile S^T = K Q^T [keys, rows] (as
FlashAttention's dK/dV loop, so the column sums are per-thread row sums, not cross-warp reductions), masks
and sums in fp32 registers, divides by |T(s)| (passed in) and writes fai for that head. No atomics: every
output has exactly one writer, so results are bitwise deterministic.

Why not 2^(S2 - log2(e) * lse): lse is one fp32 number of the size of the largest logit; at logits of a few
hundred its rounding (and the base conversion) is ~1e-4 relative in every A, beyond docs/definitions.md
section 7 for fai. With m (one of the row's own S2 values) and log2 l (small) kept apart, the row's largest
A is exact up to l's rounding.

With a layer description the rows also stop where no row sees the block: t_end <= n0 + BLOCK_N - 1 + w
(window w) and <= the end of the last key's chunk (chunks); the window / chunk / softcap masks are those of
the stats pass (sinks need nothing: they are inside l).

Row stages (H_hi = None, no window or chunk; otherwise every row block is masked, the band is short):

    lead (masked)    rows t < n0 + BLOCK_N - 1 + H_lo: part of the block lies inside the lower horizon edge
    body (no mask)   full row blocks with every t - s >= H_lo and t < seg_end
    tail (masked)    the last partial row block before seg_end
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (LOG2E, PassSpec, interpreting, launch_plan, layer_args, layer_scores2, length_key,
                            load_cols, load_rows, table_row)

# Autotune configs (GPU). BLOCK_N = resident keys per program, BLOCK_M = query rows per step.
# Kept short (one compile per config and variant). Compiled for sm_90 as the runtime specialises them
# (bench/results/compile_sm90.json): no spills in bf16 at D = 64 or 128 (70-254 registers, transposed S^T tile).
INFLUENCE_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "SPLIT_HEADS": False}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "SPLIT_HEADS": True}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "SPLIT_HEADS": True}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "SPLIT_HEADS": True}, num_warps=4, num_stages=3),
]
GPU_BLOCK_NS = tuple(sorted({c.kwargs["BLOCK_N"] for c in INFLUENCE_CONFIGS}))   # the block table's sizes
assert len(GPU_BLOCK_NS) <= 2, "the kernel addresses at most two block-table sizes"
INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_M": 32, "SPLIT_HEADS": False, "num_warps": 4, "num_stages": 1}


def default_influence_config(d_pad: int, dtype: torch.dtype) -> dict:
    """The config used without autotuning (and the only one for fp32 and D = 256). sm_90 compile report
    (bench/results/compile_sm90.json): no spills in fp16/bf16 at any D; fp32 spills at D = 128 (132-440 B) and
    D = 256 (3.8-11.6 KB), not at D = 64."""
    if interpreting():
        return dict(INTERPRET_CONFIG)
    if dtype == torch.float32:
        return {"BLOCK_N": 32, "BLOCK_M": 16, "SPLIT_HEADS": True, "num_warps": 4, "num_stages": 2}
    if d_pad >= 256:
        return {"BLOCK_N": 64, "BLOCK_M": 32, "SPLIT_HEADS": True, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_N": 128, "BLOCK_M": 64, "SPLIT_HEADS": True, "num_warps": 8, "num_stages": 2}


INFLUENCE_PASS = PassSpec("influence", "BLOCK_N", GPU_BLOCK_NS, default_influence_config, 5)


# ----------------------------------------------------------------------------------------------------------
# Block table: (batch, seg_start, seg_end, response_start, key block start), sorted by rows to visit.
# ----------------------------------------------------------------------------------------------------------
def _influence_table_rows(spans: tuple, block_n: int, horizon: tuple) -> list:
    """[(work, batch, seg_start, seg_end, response_start, n0)] for every key block of BLOCK_N keys that some
    row can attend; work = rows the block visits. An empty block keeps fai = 0 (zero-initialised)."""
    h_lo, h_hi = horizon
    entries = []
    for span in spans:
        b, start, end, resp = span.row, span.start, span.end, span.response_start
        for n0 in range(start, end, block_n):
            t_lo = max(n0 + h_lo, resp)
            t_end = end if h_hi is None else min(end, n0 + block_n + h_hi)
            if t_end > t_lo:
                entries.append((t_end - t_lo, b, start, end, resp, n0))
    return entries


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _influence_rows(col, k, q_base, norm_base, stride_qt, stride_qd, stride_norm, lo, hi, seg_start, seg_end,
                    h_lo, h_hi, sliding, chunk, scale2, cap2, neg_two_over_cap, offs_s, key_ok, offs_m, offs_d,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_HI: tl.constexpr, MASKED: tl.constexpr,
                    UPCAST: tl.constexpr, PRESCALE: tl.constexpr, HAS_SLIDING: tl.constexpr,
                    HAS_CHUNK: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """col[s] += sum_{t in [lo, hi)} A[t, s] (masked to T(s) and the layer's visible keys when MASKED; the
    caller guarantees the mask is all-true otherwise). Rows t >= response_start by construction of lo.

    Works on the transposed tile S^T = K Q^T [BLOCK_N keys, BLOCK_M rows] (as FlashAttention's dK/dV loop):
    the column sums of A become row sums of A^T, reduced inside each thread's rows instead of across warps.
    A[t, s] = 2^((S2[t,s] - m[t]) - log2 l[t]) with the stats pass's two parts of the normaliser: for the row's
    largest score S2 - m is exact (same dot, same prescaled q), so A keeps fp32 accuracy at any logit size
    (2^(S2 - lse2) with lse2 = log2(e) * lse in fp32 loses |lse| * 6e-8 relative: 1e-4 at |lse| ~ 1500)."""
    for t0 in range(lo, hi, BLOCK_M):
        offs_t = t0 + offs_m
        qt_ptrs = q_base + offs_t.to(tl.int64)[None, :] * stride_qt + offs_d[:, None] * stride_qd   # [D, M]
        row_ok = offs_t < seg_end
        qt = load_cols(qt_ptrs, row_ok, offs_d, HEAD_DIM, D_PAD, MASKED, UPCAST)
        if MASKED:
            row_max = tl.load(norm_base + offs_t, mask=row_ok, other=0.0)
            log2_l = tl.load(norm_base + stride_norm + offs_t, mask=row_ok, other=0.0)
        else:
            row_max = tl.load(norm_base + offs_t)
            log2_l = tl.load(norm_base + stride_norm + offs_t)
        if PRESCALE:
            qt = qt * scale2                                                    # as the stats pass's q
        s2t = layer_scores2(tl.dot(k, qt, input_precision=DOT_PREC), scale2, cap2, neg_two_over_cap, PRESCALE,
                             SOFTCAP)                                           # S2'[t, s] as [s, t]
        pt = tl.exp2((s2t - row_max[None, :]) - log2_l[None, :])               # A[t, s] as [s, t]
        if MASKED:
            lag = offs_t[None, :] - offs_s[:, None]                             # t - s
            ok = row_ok[None, :] & key_ok[:, None] & (lag >= h_lo)
            if HAS_HI:
                ok = ok & (lag <= h_hi)
            if HAS_SLIDING:
                ok = ok & (lag < sliding)
            if HAS_CHUNK:
                ok = ok & ((offs_t - seg_start)[None, :] // chunk == (offs_s - seg_start)[:, None] // chunk)
            pt = tl.where(ok, pt, 0.0)
        col += tl.sum(pt, 1)
    return col


@triton.jit(do_not_specialize=["table_off_small", "table_off_large", "stride_mb", "stride_mh", "stride_norm",
                               "stride_cb", "n_q_heads", "n_kv_heads", "group", "h_lo", "h_hi", "sliding", "chunk",
                               "len_key"])
def _influence_kernel(Q, K, Norm, Counts, Fai, Table, table_off_small, table_off_large,
                      stride_qb, stride_qh, stride_qt, stride_qd,
                      stride_kb, stride_kh, stride_kt, stride_kd,
                      stride_mb, stride_mh, stride_norm, stride_cb,
                      n_q_heads, n_kv_heads, group, h_lo, h_hi, sliding, chunk, scale2, cap2, neg_two_over_cap,
                      len_key,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_HI: tl.constexpr, UPCAST: tl.constexpr,
                      PRESCALE: tl.constexpr, HAS_SLIDING: tl.constexpr, HAS_CHUNK: tl.constexpr,
                      VISIBLE: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, SMALL_BLOCK: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_HEADS: tl.constexpr):
    """Q [B, Hq, T, D], K [B, Hkv, T, D] (any strides); Fai fp32 [B, Hq, T] (unit stride on T); Norm fp32
    [2, B, Hq, T] (the stats pass's m and log2 l, strides of Fai, planes stride_norm apart); Counts int64
    [B, T] = |T(s)|. Table int32 [n, 5] = (batch, seg_start, seg_end, response_start, n0). h_lo, h_hi at most
    the longest segment (clamped on the host, so n0 + BLOCK_N + h_hi fits int32). sliding / chunk / cap2 /
    neg_two_over_cap: the layer (see the stats kernel); sinks need nothing here (they are inside Norm's l)."""
    pid = tl.program_id(0)
    if SPLIT_HEADS:                        # one query head per program
        kv_head = (pid % n_q_heads) // group
        g_start = (pid % n_q_heads) % group
        g_stop = g_start + 1
        entry = pid // n_q_heads
    else:                                  # the whole GQA group per program
        kv_head = pid % n_kv_heads
        g_start = 0
        g_stop = group
        entry = pid // n_kv_heads
    row = table_row(Table, entry, table_off_small, table_off_large, 5, BLOCK_N, SMALL_BLOCK)
    batch = tl.load(row).to(tl.int64)
    seg_start = tl.load(row + 1)
    seg_end = tl.load(row + 2)
    resp = tl.load(row + 3)
    n0 = tl.load(row + 4)

    offs_s = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    key_ok = offs_s < seg_end
    k_ptrs = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh + offs_s.to(tl.int64)[:, None] * stride_kt \
        + offs_d[None, :] * stride_kd
    k = load_rows(k_ptrs, key_ok, offs_d, HEAD_DIM, D_PAD, True, UPCAST)
    count = tl.load(Counts + batch * stride_cb + offs_s, mask=key_ok, other=0).to(tl.float32)

    # rows that can attend this key block: [t_lo, t_end)
    t_lo = tl.maximum(n0 + h_lo, resp)
    if HAS_HI or VISIBLE:
        t_end = seg_end
        if HAS_HI:
            t_end = tl.minimum(t_end, n0 + BLOCK_N + h_hi)
        if HAS_SLIDING:
            t_end = tl.minimum(t_end, n0 + BLOCK_N - 1 + sliding)          # t - s < w for s <= n0 + BLOCK_N - 1
        if HAS_CHUNK:
            last = tl.minimum(n0 + BLOCK_N, seg_end) - 1                   # rows past the last key's chunk see none
            t_end = tl.minimum(t_end, last - (last - seg_start) % chunk + chunk)
    else:
        # lead: rows below n0 + BLOCK_N - 1 + H_lo need the horizon mask; body: whole unmasked row blocks
        n_lead = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 + h_lo - t_lo, 0), BLOCK_M)
        t_mid = t_lo + n_lead * BLOCK_M
        t_tail = t_mid + (tl.maximum(seg_end - t_mid, 0) // BLOCK_M) * BLOCK_M

    for g in range(g_start, g_stop):
        head = kv_head.to(tl.int64) * group + g
        q_base = Q + batch * stride_qb + head * stride_qh
        norm_base = Norm + batch * stride_mb + head * stride_mh
        col = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_HI or VISIBLE:
            col = _influence_rows(col, k, q_base, norm_base, stride_qt, stride_qd, stride_norm, t_lo, t_end,
                                  seg_start, seg_end, h_lo, h_hi, sliding, chunk, scale2, cap2, neg_two_over_cap,
                                  offs_s, key_ok, offs_m, offs_d, HEAD_DIM, D_PAD, HAS_HI, True, UPCAST, PRESCALE,
                                  HAS_SLIDING, HAS_CHUNK, SOFTCAP, DOT_PREC, BLOCK_M)
        else:
            col = _influence_rows(col, k, q_base, norm_base, stride_qt, stride_qd, stride_norm, t_lo,
                                  tl.minimum(t_mid, seg_end), seg_start, seg_end, h_lo, h_hi, sliding, chunk, scale2,
                                  cap2, neg_two_over_cap, offs_s, key_ok, offs_m, offs_d, HEAD_DIM, D_PAD, HAS_HI,
                                  True, UPCAST, PRESCALE, HAS_SLIDING, HAS_CHUNK, SOFTCAP, DOT_PREC, BLOCK_M)
            col = _influence_rows(col, k, q_base, norm_base, stride_qt, stride_qd, stride_norm, t_mid, t_tail,
                                  seg_start, seg_end, h_lo, h_hi, sliding, chunk, scale2, cap2, neg_two_over_cap,
                                  offs_s, key_ok, offs_m, offs_d, HEAD_DIM, D_PAD, HAS_HI, False, UPCAST, PRESCALE,
                                  HAS_SLIDING, HAS_CHUNK, SOFTCAP, DOT_PREC, BLOCK_M)
            col = _influence_rows(col, k, q_base, norm_base, stride_qt, stride_qd, stride_norm, t_tail, seg_end,
                                  seg_start, seg_end, h_lo, h_hi, sliding, chunk, scale2, cap2, neg_two_over_cap,
                                  offs_s, key_ok, offs_m, offs_d, HEAD_DIM, D_PAD, HAS_HI, True, UPCAST, PRESCALE,
                                  HAS_SLIDING, HAS_CHUNK, SOFTCAP, DOT_PREC, BLOCK_M)
        # mean over T(s); A <= 1 exactly, rounding of the recomputed scores may not: clip to [0, 1]
        fai = tl.where(count > 0, tl.minimum(col / tl.maximum(count, 1.0), 1.0), 0.0)
        tl.store(Fai + batch * stride_mb + head * stride_mh + offs_s, fai, mask=key_ok)


_influence_kernel_tuned = triton.autotune(configs=INFLUENCE_CONFIGS, key=["len_key", "HEAD_DIM", "HAS_HI"],
                                          )(_influence_kernel)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------
def influence_pass(q: torch.Tensor, k: torch.Tensor, norm: torch.Tensor, segments, counts: torch.Tensor, *,
                   horizon: tuple, scale: float, layer=None, config: dict | None = None,
                   table_sizes: tuple | None = None) -> torch.Tensor:
    """Run the influence pass.

    q [B, Hq, T, D], k [B, Hkv, T, D]; norm float32 [2, B, Hq, T], the stats pass's ``StatsResult.norm``
    (unit stride on T); counts int64 [B, T] = |T(s)| (``influence_counts``). Returns fai float32 [B, Hq, T]
    (0 on padding and where T(s) is empty). layer: the ``LayerAttention`` the stats pass ran with (None =
    plain causal); with a window w a key block visits only the rows up to w - 1 after it.
    ``config`` (tests, pinned configs): a fixed {BLOCK_N, BLOCK_M, SPLIT_HEADS, num_warps, num_stages} instead
    of the default / autotuned one; ``table_sizes`` the BLOCK_N sizes to build the block table for (default:
    just config's).
    """
    batch, q_heads, length, _ = q.shape
    kv_heads = k.shape[1]
    if tuple(norm.shape) != (2, batch, q_heads, length) or norm.dtype != torch.float32:
        raise ValueError(f"norm must be the stats pass's float32 [2, B, Hq, T] = [2, {batch}, {q_heads}, {length}] "
                         f"(StatsResult.norm), got {norm.dtype} {tuple(norm.shape)}")
    # T(s) never reaches past the longest segment: larger horizons are the same horizons, and keep
    # n0 + BLOCK_N + H_hi inside int32 (a caller may pass 2**31 - 1 for "to the end")
    longest = segments.max_len
    h_lo = min(int(horizon[0]), longest)
    h_hi = None if horizon[1] is None else min(int(horizon[1]), longest)
    fai = torch.zeros(batch, q_heads, length, dtype=torch.float32, device=q.device)
    layer_ = layer_args(layer, longest, q.device)
    if norm.stride()[1:] != fai.stride():
        norm = norm.contiguous()                        # the kernel reads norm with fai's strides
    counts = counts.to(device=q.device, dtype=torch.int64)
    if counts.stride(1) != 1:
        counts = counts.contiguous()

    spans = segments.spans
    plan = launch_plan(INFLUENCE_PASS, _influence_kernel, _influence_kernel_tuned, q,
                       lambda bn: _influence_table_rows(spans, bn, (h_lo, h_hi)), (spans, h_lo, h_hi), config,
                       table_sizes)
    if plan.programs == 0:
        return fai                                      # every T(s) is empty (e.g. empty responses)
    plan.kernel[plan.grid(lambda META: q_heads if META["SPLIT_HEADS"] else kv_heads)](
        q, k, norm, counts, fai, plan.table, plan.off_small, plan.off_large,
        *q.stride(), *k.stride(),
        norm.stride(1), norm.stride(2), norm.stride(0), counts.stride(0),
        q_heads, kv_heads, q_heads // kv_heads, h_lo, 0 if h_hi is None else h_hi, layer_.sliding, layer_.chunk,
        float(scale) * LOG2E, layer_.cap2, layer_.neg_two_over_cap, length_key(longest),
        HAS_HI=h_hi is not None, **{key: flag for key, flag in layer_.flags.items() if key != "HAS_SINKS"},
        **plan.constexprs, **plan.meta,
    )
    return fai
