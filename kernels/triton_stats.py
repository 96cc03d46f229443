"""Stats pass: one FlashAttention-style forward over query blocks (row-parallel).

For every query row t of every query head (docs/definitions.md section 2), in one sweep over the causal keys
of its segment:

    lse[t]      = log sum_{s<=t} exp(S[t,s])                          (natural log)
    distance[t] = sum_{s<=t} A[t,s] * (t - s)
    waad[t]     = (sum_{t-s<W} A[t,s] * (t - s)) + W * sum_{t-s>=W} A[t,s]
    out[t]      = sum_{s<=t} A[t,s] * v_s                             (only when v is given)

Online softmax in base 2: S2 = scale * log2(e) * q.k, per row the running max m, the running sum
l = sum 2^(S2 - m), and three more accumulators rescaled by the same alpha = 2^(m_old - m_new) as l:
d (distance numerator), near (sum p * (t - s) over t - s < W) and far (sum p over t - s >= W). A[t,s] is
never stored. m and log2 l are also written out (``StatsResult.norm``) for the influence pass.

The key loop of a query block [m0, m0 + BLOCK_M) has two stages (as the Triton fused-attention tutorial):

    off-band  keys [seg_start, off_end): every key is at least W behind every row of the block, so there is
              no causal mask and every key is "far"; only l, d (and O) accumulate (far = l afterwards).
    on-band   keys [off_end, min(m0 + BLOCK_M, seg_end)): the W-band and the causal diagonal; masks here only.

Every accumulated term is non-negative, so nothing cancels in fp32:
- distance is never "t minus a large mean": the off-band stage adds p * (m0 - s) (all > 0), the switch to
  the on-band stage adds (t - m0) * l (>= 0), and the on-band stage adds p * (t - s) (>= 0);
- waad is never "W minus the band": W - sum_{t-s<W} A (W - (t - s)) loses about W * 6e-8 in fp32 (2e-2 at
  W = 1e5); (near + W * far) / l has no such term, for any W. W is clamped to the longest segment on the
  host (a larger W gives the same min(t - s, W)), so W >= the segment length is exactly distance.

A layer description (``LayerAttention``; each mechanism a constexpr flag, compiled out when unused):

    sliding window w / chunk c   row t sees keys from first(t) = max(seg_start, t - w + 1, start of t's chunk);
                                 the block's key loop starts at first(m0): O(w + BLOCK_M) keys per block. The
                                 unmasked off-band stage starts at first(last row) (keys every row sees); the
                                 keys [first(m0), first(last row)) go through the masked loop.
    softcap                      S2' = cap2 * tanh(S2 / cap2), cap2 = cap * log2(e), tanh from exp2
    sinks                        the running max starts at the sink logit (base 2); its mass 2^(sink - m) joins
                                 l at the end, so rows sum to < 1 and far (keys only) excludes it

fp32 inputs (PRESCALE): q is multiplied by scale * log2(e) before the dot, so the dot result is S2 itself,
and K is loaded already transposed; the influence pass does the same, so both passes see bitwise the same
S2. A scale so small that scale * log2(e) is 0 in fp32 gives all-zero logits (uniform attention): the masks
are applied after scaling, so no -inf * 0 = NaN.

Grid: one program per (query block of a segment, query head), flattened to 1-D with the head fastest
(programs of one block share K/V in L2). The query blocks come from a block table sorted by work
(keys to visit, descending), so the long segments' late blocks start first (longest-processing-time order)
and a packed batch is not sized by the longest sequence times the number of segments.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_common import (LOG2E, PassSpec, interpreting, launch_plan, layer_args, layer_scores2, length_key,
                            load_cols, load_rows, table_row)

# Autotune configs (GPU). BLOCK_M = query rows per program, BLOCK_N = keys per step.
# Kept short on purpose: every config is one more compile per (D, HAS_V, dtype) variant. Compiled for sm_90 as
# the runtime specialises them (bench/results/compile_sm90.json): none spills in bf16 at D = 64 or 128, with
# or without v; 128x128 with v at D = 128 takes 255 registers and 160 KB of shared memory.
STATS_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]
# The two BLOCK_M sizes the block table is built for on GPU; under the interpreter one small fixed config.
GPU_BLOCK_MS = tuple(sorted({c.kwargs["BLOCK_M"] for c in STATS_CONFIGS}))      # the block table's sizes
assert len(GPU_BLOCK_MS) <= 2, "the kernel addresses at most two block-table sizes"
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def default_stats_config(d_pad: int, dtype: torch.dtype) -> dict:
    """The config used without autotuning (and the only one for fp32 and D = 256). fp32 uses the IEEE dot on
    CUDA cores (the correctness path: small tiles). sm_90 compile report (bench/results/compile_sm90.json):
    no spills in fp16/bf16 at any D; fp32 spills at D = 128 (320 B without v, 672 B with v), not at 64 or 256."""
    if interpreting():
        return dict(INTERPRET_CONFIG)
    if dtype == torch.float32:
        if d_pad >= 256:
            return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
        return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
    if d_pad >= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


STATS_PASS = PassSpec("stats", "BLOCK_M", GPU_BLOCK_MS, default_stats_config, 4)


# ----------------------------------------------------------------------------------------------------------
# Block table: (batch, segment start, segment end, query block start) per program, sorted by work.
# ----------------------------------------------------------------------------------------------------------
def _stats_table_rows(spans: tuple, block_m: int) -> list:
    """[(work, batch, seg_start, seg_end, m0)] for every query block of BLOCK_M rows; work = keys visited by
    the block's last row."""
    return [(min(m0 + block_m, span.end) - span.start, span.row, span.start, span.end, m0)
            for span in spans for m0 in range(span.start, span.end, block_m)]


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _first_visible(t, seg_start, sliding, chunk, HAS_SLIDING: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """First key row t sees: max(seg_start, t - sliding + 1 (window), start of t's chunk (chunked))."""
    lo = t * 0 + seg_start
    if HAS_SLIDING:
        lo = tl.maximum(lo, t - sliding + 1)
    if HAS_CHUNK:
        lo = tl.maximum(lo, t - (t - seg_start) % chunk)
    return lo


@triton.jit
def _stats_offband(acc, m_i, l_i, d_acc, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   lo, hi, m0, scale2, cap2, neg_two_over_cap, offs_n, offs_d, offs_dv,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
                   HAS_V: tl.constexpr, UPCAST: tl.constexpr,
                   PRESCALE: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi): visible to every row of the block and all <= m0 - W: no mask, every key is "far"."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_s = n0 + offs_n
        kt = load_cols(k_base + offs_s.to(tl.int64)[None, :] * stride_kt + offs_d[:, None] * stride_kd, offs_s,
                          offs_d, HEAD_DIM, D_PAD, False, UPCAST)
        s2 = layer_scores2(tl.dot(q, kt, input_precision=DOT_PREC), scale2, cap2, neg_two_over_cap, PRESCALE,
                            SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s2, 1))                              # base-2 running max
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # distance numerator, off-band part: sum_s p * (m0 - s), every (m0 - s) > 0
        d_acc = d_acc * alpha + tl.sum(p * (m0 - offs_s).to(tl.float32)[None, :], 1)
        if HAS_V:
            v = load_rows(v_base + offs_s.to(tl.int64)[:, None] * stride_vt + offs_dv[None, :] * stride_vd, offs_s,
                          offs_dv, V_DIM, DV_PAD, False, UPCAST)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i, d_acc


@triton.jit
def _stats_masked(acc, m_i, l_i, d_acc, near, far, q, k_base, v_base, stride_kt, stride_kd, stride_vt,
                  stride_vd, lo, hi, window, scale2, cap2, neg_two_over_cap, offs_m, lo_row, offs_n, offs_d,
                  offs_dv, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, V_DIM: tl.constexpr,
                  DV_PAD: tl.constexpr, HAS_V: tl.constexpr, UPCAST: tl.constexpr,
                  PRESCALE: tl.constexpr, SOFTCAP: tl.constexpr, VISIBLE: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Keys [lo, hi) (hi <= the segment end) with every mask: causal, the range and (VISIBLE) each row's first
    visible key lo_row; near/far split at W. Plain causal: the W-band and the diagonal. With a window or chunks
    also the keys only some rows of the block see. The last tile may reach past hi: those keys are masked."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_s = n0 + offs_n
        key_ok = offs_s < hi
        kt = load_cols(k_base + offs_s.to(tl.int64)[None, :] * stride_kt + offs_d[:, None] * stride_kd, key_ok,
                          offs_d, HEAD_DIM, D_PAD, True, UPCAST)
        lag = offs_m[:, None] - offs_s[None, :]                               # t - s
        valid = (lag >= 0) & key_ok[None, :]
        if VISIBLE:
            valid = valid & (offs_s[None, :] >= lo_row[:, None])
        s2 = layer_scores2(tl.dot(q, kt, input_precision=DOT_PREC), scale2, cap2, neg_two_over_cap, PRESCALE,
                            SOFTCAP)
        # masked after scaling: a scale that underflows to 0 in fp32 must not turn -inf * 0 into NaN
        s2 = tl.where(valid, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        if VISIBLE:
            # a row may see no key of this block and none before: keep its max finite for the exponents
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        # (plain causal: finite, the first block visited holds key <= m0 <= t)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s2 - m_new[:, None])                                      # 0 where masked
        l_i = l_i * alpha + tl.sum(p, 1)
        lag_f = lag.to(tl.float32)
        d_acc = d_acc * alpha + tl.sum(p * lag_f, 1)                          # p * (t - s), >= 0
        is_near = lag < window
        near = near * alpha + tl.sum(tl.where(is_near, p * lag_f, 0.0), 1)   # p * (t - s) for t - s < W
        far = far * alpha + tl.sum(tl.where(is_near, 0.0, p), 1)             # p for t - s >= W
        if HAS_V:
            v = load_rows(v_base + offs_s.to(tl.int64)[:, None] * stride_vt + offs_dv[None, :] * stride_vd, key_ok,
                          offs_dv, V_DIM, DV_PAD, True, UPCAST)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i, d_acc, near, far


# Runtime ints that vary between calls are not specialized (Triton would compile a variant for every value
# equal to 1 or divisible by 16): the table offsets, head counts, the windows, the length key and the strides
# of the fp32 outputs (functions of T). The input strides are, so the unit head-dim stride keeps vectorized
# loads.
@triton.jit(do_not_specialize=["table_off_small", "table_off_large", "stride_mb", "stride_mh", "stride_norm",
                               "n_q_heads", "group", "window", "sliding", "chunk", "len_key"])
def _stats_kernel(Q, K, V, Out, Lse, Dist, Waad, Norm, Sinks, Table, table_off_small, table_off_large,
                  stride_qb, stride_qh, stride_qt, stride_qd,
                  stride_kb, stride_kh, stride_kt, stride_kd,
                  stride_vb, stride_vh, stride_vt, stride_vd,
                  stride_ob, stride_oh, stride_ot, stride_od,
                  stride_mb, stride_mh, stride_norm,
                  n_q_heads, group, window, sliding, chunk, scale2, cap2, neg_two_over_cap, len_key,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
                  HAS_V: tl.constexpr, UPCAST: tl.constexpr,
                  PRESCALE: tl.constexpr, HAS_SLIDING: tl.constexpr, HAS_CHUNK: tl.constexpr,
                  VISIBLE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, DOT_PREC: tl.constexpr,
                  SMALL_BLOCK: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Q [B, Hq, T, D], K [B, Hkv, T, D], V [B, Hkv, T, Dv] (any strides; D = HEAD_DIM padded to D_PAD, Dv =
    V_DIM padded to DV_PAD; Dv != D for MLA); Out [B, T, Hq, Dv]; Lse/Dist/Waad fp32 [B, Hq, T]
    (unit stride on T); Norm fp32 [2, B, Hq, T] (same strides as Lse, planes stride_norm apart): the row's
    base-2 max m and log2 l, for the influence pass. Sinks fp32 [Hq] (base-2 sink logits, HAS_SINKS).
    Table int32 [n, 4] = (batch, seg_start, seg_end, block_start), the rows for this BLOCK_M starting at
    table_off_small (BLOCK_M == SMALL_BLOCK) or table_off_large. window: W, at most the longest segment (clamped
    on the host). sliding / chunk: the layer's window and chunk size (HAS_SLIDING / HAS_CHUNK); cap2 and
    neg_two_over_cap: the softcap in base 2 (SOFTCAP). VISIBLE = HAS_SLIDING or HAS_CHUNK. Plain causal
    attention compiles all of them out."""
    pid = tl.program_id(0)
    head = pid % n_q_heads
    entry = pid // n_q_heads
    row = table_row(Table, entry, table_off_small, table_off_large, 4, BLOCK_M, SMALL_BLOCK)
    batch = tl.load(row).to(tl.int64)
    seg_start = tl.load(row + 1)
    seg_end = tl.load(row + 2)
    m0 = tl.load(row + 3)
    kv_head = (head // group).to(tl.int64)
    head64 = head.to(tl.int64)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < seg_end

    q_ptrs = Q + batch * stride_qb + head64 * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qt \
        + offs_d[None, :] * stride_qd
    q = load_rows(q_ptrs, row_ok, offs_d, HEAD_DIM, D_PAD, True, UPCAST)
    if PRESCALE:
        q = q * scale2                                      # fp32: the dot yields S2 itself (see _scores2)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    if HAS_SINKS:
        # the sink is a logit without a key: the running max starts at it, its mass 2^(sink - m) joins l at
        # the end (l_i below sums the keys only, so that far, the mass of keys >= W back, excludes it)
        sink2 = tl.load(Sinks + head)
        m_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + sink2
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    d_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    near = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)

    on_end = tl.minimum(m0 + BLOCK_M, seg_end)             # keys past the block's last row are never visited
    # keys every row of the block sees start at the last row's first visible key (plain causal: seg_start)
    if VISIBLE:
        lo_row = _first_visible(offs_m, seg_start, sliding, chunk, HAS_SLIDING, HAS_CHUNK)
        lo_all = _first_visible(on_end - 1, seg_start, sliding, chunk, HAS_SLIDING, HAS_CHUNK)
    else:
        lo_row = offs_m
        lo_all = seg_start
    # off-band: whole key blocks in [lo_all, m0 - W] (so t - s >= W for every row t >= m0), no mask
    off_end = lo_all + (tl.maximum(m0 - window + 1 - lo_all, 0) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i, d_acc = _stats_offband(acc, m_i, l_i, d_acc, q, k_base, v_base, stride_kt, stride_kd,
                                          stride_vt, stride_vd, lo_all, off_end, m0, scale2, cap2, neg_two_over_cap,
                                          offs_n, offs_d, offs_dv, HEAD_DIM, D_PAD, V_DIM, DV_PAD, HAS_V, UPCAST,
                                          PRESCALE, SOFTCAP, DOT_PREC,
                                          BLOCK_N)
    # sum p * (m0 - s) + (t - m0) * sum p = sum p * (t - s); both terms >= 0
    d_acc += (offs_m - m0).to(tl.float32) * l_i
    far = l_i                                               # every off-band key is at least W behind
    if VISIBLE:
        # the keys only some rows see: [first key of the block's first row, lo_all), masked per row
        lo_first = _first_visible(m0, seg_start, sliding, chunk, HAS_SLIDING, HAS_CHUNK)
        acc, m_i, l_i, d_acc, near, far = _stats_masked(
            acc, m_i, l_i, d_acc, near, far, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            lo_first, lo_all, window, scale2, cap2, neg_two_over_cap, offs_m, lo_row, offs_n, offs_d, offs_dv,
            HEAD_DIM, D_PAD, V_DIM, DV_PAD, HAS_V, UPCAST, PRESCALE, SOFTCAP, VISIBLE, DOT_PREC, BLOCK_N)
    # on-band: the rest up to the diagonal
    acc, m_i, l_i, d_acc, near, far = _stats_masked(
        acc, m_i, l_i, d_acc, near, far, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        off_end, on_end, window, scale2, cap2, neg_two_over_cap, offs_m, lo_row, offs_n, offs_d, offs_dv,
        HEAD_DIM, D_PAD, V_DIM, DV_PAD, HAS_V, UPCAST, PRESCALE, SOFTCAP, VISIBLE, DOT_PREC, BLOCK_N)

    if HAS_SINKS:
        l_i = l_i + tl.exp2(sink2 - m_i)                    # the normaliser counts the sink, the metrics do not
    inv_l = 1.0 / l_i
    log2_l = tl.log2(l_i)
    lse = (m_i + log2_l) * 0.6931471805599453                                # back to natural log
    dist = d_acc * inv_l
    # waad = (sum_{t-s<W} p (t-s) + W * sum_{t-s>=W} p) / l: non-negative terms only, no cancellation for any
    # W (the band identity W - sum p (W - (t-s)) / l loses W * 6e-8 in fp32). Exactly waad <= min(W, distance);
    # the two sums round differently, so the tie is restored by the clip.
    waad = tl.minimum(tl.minimum((near + window.to(tl.float32) * far) * inv_l, window.to(tl.float32)), dist)
    m_off = batch * stride_mb + head64 * stride_mh + offs_m.to(tl.int64)
    tl.store(Lse + m_off, lse, mask=row_ok)
    tl.store(Dist + m_off, dist, mask=row_ok)
    tl.store(Waad + m_off, waad, mask=row_ok)
    tl.store(Norm + m_off, m_i, mask=row_ok)
    tl.store(Norm + stride_norm + m_off, log2_l, mask=row_ok)
    if HAS_V:
        o = acc * inv_l[:, None]
        o_ptrs = Out + batch * stride_ob + head64 * stride_oh + offs_m.to(tl.int64)[:, None] * stride_ot \
            + offs_dv[None, :] * stride_od
        if V_DIM == DV_PAD:
            tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])
        else:
            tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < V_DIM))


_stats_kernel_tuned = triton.autotune(configs=STATS_CONFIGS, key=["len_key", "HEAD_DIM", "HAS_V"])(_stats_kernel)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------
class StatsResult(NamedTuple):
    """What the stats pass returns. lse, distance, waad: float32 [B, Hq, T] (0 on padding). out: [B, T, Hq, Dv]
    in q.dtype (0 on padding rows), None without v. norm: float32 [2, B, Hq, T], the row's softmax normaliser
    in two parts for the influence pass: norm[0] = m, the base-2 running max (one of the row's own S2 values),
    norm[1] = log2 l, l = sum_s 2^(S2 - m) >= 1. lse = ln 2 * (m + log2 l) rounds the sum to fp32; at logits of
    a few hundred one ulp of it is ~1e-4 relative in A, so A is recomputed from the parts instead."""

    lse: torch.Tensor
    distance: torch.Tensor
    waad: torch.Tensor
    out: torch.Tensor | None
    norm: torch.Tensor


def stats_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, segments, *, window: int,
               scale: float, layer=None, config: dict | None = None,
               table_sizes: tuple | None = None) -> StatsResult:
    """Run the stats pass.

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] (Dv may differ from D; same dtype, any strides),
    segments: ``Segments``; window >= 1 (any
    size: a W at least the longest segment is plain distance); layer: a ``LayerAttention`` (sliding window,
    chunks, softcap, sinks [Hq]) or None for plain causal attention. With a window w a query block visits
    about w + BLOCK_M keys (not its whole causal prefix). Returns a ``StatsResult``; with v None the PV
    product is compiled out.
    ``config`` / ``table_sizes`` (tests): a fixed {BLOCK_M, BLOCK_N, num_warps, num_stages} and the BLOCK_M
    sizes to build the block table for (default: just config's), instead of the default / autotuned setup.
    """
    batch, q_heads, length, dim = q.shape
    covered = sum(span.length for span in segments.spans) == batch * length
    alloc = torch.empty if covered else torch.zeros
    lse = alloc(batch, q_heads, length, dtype=torch.float32, device=q.device)
    dist, waad = alloc(lse.shape, dtype=torch.float32, device=q.device), alloc(lse.shape, dtype=torch.float32,
                                                                                  device=q.device)
    norm = alloc(2, batch, q_heads, length, dtype=torch.float32, device=q.device)
    has_v = v is not None
    v_dim = v.shape[-1] if has_v else dim                      # without v: V_DIM is unused, any value
    out = alloc(batch, length, q_heads, v_dim, dtype=q.dtype, device=q.device) if has_v else None
    v_arg, out_arg = (v, out) if has_v else (k, lse)           # dummies, never touched when HAS_V is False
    v_strides = v.stride() if has_v else (0, 0, 0, 0)
    # out is [B, T, Hq, Dv]: strides in the kernel's (b, h, t, d) order
    o_strides = (out.stride(0), out.stride(2), out.stride(1), out.stride(3)) if has_v else (0, 0, 0, 0)
    # min(t - s, W) only sees lags < the longest segment: a larger W is the same W, and fits int32
    window = max(1, min(int(window), segments.max_len))
    layer_ = layer_args(layer, segments.max_len, q.device)

    spans = segments.spans
    plan = launch_plan(STATS_PASS, _stats_kernel, _stats_kernel_tuned, q, lambda bm: _stats_table_rows(spans, bm),
                       (spans,), config, table_sizes, v_dim=v_dim)
    plan.kernel[plan.grid(lambda META: q_heads)](
        q, k, v_arg, out_arg, lse, dist, waad, norm, lse if layer_.sinks2 is None else layer_.sinks2, plan.table,
        plan.off_small, plan.off_large,
        *q.stride(), *k.stride(), *v_strides, *o_strides,
        lse.stride(0), lse.stride(1), norm.stride(0),
        q_heads, q_heads // k.shape[1], window, layer_.sliding, layer_.chunk, float(scale) * LOG2E, layer_.cap2,
        layer_.neg_two_over_cap, length_key(segments.max_len),
        HAS_V=has_v, **plan.constexprs, **layer_.flags, **plan.meta,
    )
    return StatsResult(lse, dist, waad, out, norm)
