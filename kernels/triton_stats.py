"""Stats pass: one FlashAttention-style forward over query blocks (row-parallel).

For every query row t of every query head (docs/definitions.md section 2), in one sweep over the causal keys
of its segment:

    lse[t]      = log sum_{s<=t} exp(S[t,s])                          (natural log)
    distance[t] = sum_{s<=t} A[t,s] * (t - s)
    waad[t]     = W - sum_{t-W<s<=t} A[t,s] * (W - (t - s))           (the W-band identity)
    out[t]      = sum_{s<=t} A[t,s] * v_s                             (only when v is given)

Online softmax in base 2: S2 = scale * log2(e) * q.k, per row the running max m, the running sum
l = sum 2^(S2 - m), and two more accumulators rescaled by the same alpha = 2^(m_old - m_new) as l:
d (distance numerator) and w (W-band numerator). A[t,s] is never stored.

The key loop of a query block [m0, m0 + BLOCK_M) has two stages (as the Triton fused-attention tutorial):

    off-band  keys [seg_start, off_end): every key is at least W behind every row of the block, so there is
              no causal mask and min(t - s, W) = W (no W-band term); only l, d (and O) accumulate.
    on-band   keys [off_end, min(m0 + BLOCK_M, seg_end)): the W-band and the causal diagonal; masks here only.

The distance is accumulated exactly, never as "t minus a large mean" (that cancels in fp32 at long T): the
off-band stage adds p * (m0 - s) (all > 0), the switch to the on-band stage adds (t - m0) * l (>= 0), and
the on-band stage adds p * (t - s) (>= 0): every term is non-negative, so there is no cancellation.

Grid: one program per (query block of a segment, query head), flattened to 1-D with the head fastest
(programs of one block share K/V in L2). The query blocks come from a block table sorted by work
(keys to visit, descending), so the long segments' late blocks start first (longest-processing-time order)
and a packed batch is not sized by the longest sequence times the number of segments.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Autotune configs (GPU). BLOCK_M = query rows per program, BLOCK_N = keys per step.
# Kept short on purpose: every config is one more compile per (D, HAS_V, dtype) variant. Checked by compiling
# for sm_90 (ptxas -v): 128x64/w8 spills 32 B with v at D = 128 (0 otherwise), 128x32/w8 never spills,
# 128x128 and 64x64/w4 spill with v at D = 128 (kept for the metrics-only mode and D = 64).
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


def interpreting() -> bool:
    """True under the Triton CPU interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _patch_interpreter_scalar_index() -> None:
    """Interpreter-only fix: Triton 3.6's interpreter turns a scalar into a loop bound with int(array) on a
    1-element array, which numpy >= 2.4 refuses (triton-lang/triton#9171), so every loop with a runtime bound
    fails. Squeeze first. Compiled (GPU) kernels are untouched."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_rhythm_scalar_index_patch", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._rhythm_scalar_index_patch = True


if interpreting():
    _patch_interpreter_scalar_index()


def autotune_enabled() -> bool:
    """GPU autotuning is on unless RHYTHM_TRITON_AUTOTUNE=0 (the test suite turns it off to save compiles)."""
    return not interpreting() and os.environ.get("RHYTHM_TRITON_AUTOTUNE", "1") != "0"


def default_stats_config(d_pad: int, dtype: torch.dtype) -> dict:
    """The config used without autotuning (and the only one for fp32 and D = 256): tiles that compile
    without register spills on sm_90 (D = 256 in fp16/bf16: 80 B). fp32 uses the IEEE dot on CUDA cores (the
    correctness path: small tiles)."""
    if interpreting():
        return dict(INTERPRET_CONFIG)
    if dtype == torch.float32:
        if d_pad >= 256:
            return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
        return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
    if d_pad >= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


# ----------------------------------------------------------------------------------------------------------
# Block table: (batch, segment start, segment end, query block start) per program, sorted by work.
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _stats_table_host(host: tuple, block_ms: tuple) -> tuple[list, dict]:
    rows, offsets = [], {}
    for bm in block_ms:
        entries = []
        for b, start, end, _ in host:
            for m0 in range(start, end, bm):
                work = min(m0 + bm, end) - start          # keys visited by the block's last row
                entries.append((work, b, start, end, m0))
        entries.sort(key=lambda e: -e[0])                 # stable: ties keep segment order
        offsets[bm] = (len(rows), len(entries))
        rows.extend(e[1:] for e in entries)
    return rows, offsets


_DEVICE_TABLES: dict = {}


def cached_device_table(key: tuple, build_host, width: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Upload a host block table once per (key, device): int32 [n, width] and its {block: (offset, count)}.

    build_host() -> (rows, offsets). Shared by both passes; bounded to 64 entries."""
    key = key + (str(device),)
    if key not in _DEVICE_TABLES:
        rows, offsets = build_host()
        table = torch.tensor(rows, dtype=torch.int32).reshape(-1, width).to(device)
        if len(_DEVICE_TABLES) > 64:
            _DEVICE_TABLES.clear()
        _DEVICE_TABLES[key] = (table, offsets)
    return _DEVICE_TABLES[key]


def stats_block_table(host: tuple, block_ms: tuple, device: torch.device) -> tuple[torch.Tensor, dict]:
    """int32 [n, 4] device table for every BLOCK_M in block_ms and {BLOCK_M: (offset, count)} (cached)."""
    return cached_device_table(("stats", host, block_ms), lambda: _stats_table_host(host, block_ms), 4, device)


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptrs, rows_ok, offs_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROW_MASK: tl.constexpr,
               UPCAST: tl.constexpr):
    """Load a [rows, D_PAD] tile, zero outside the real rows / head dim; fp32 right away under UPCAST."""
    if ROW_MASK:
        if HEAD_DIM == D_PAD:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == D_PAD:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _stats_offband(acc, m_i, l_i, d_acc, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   lo, hi, m0, scale2, offs_n, offs_d,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_V: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi), all <= m0 - W: no mask, no W-band term."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_s = n0 + offs_n
        rows_s = offs_s.to(tl.int64)[:, None]
        k = _load_tile(k_base + rows_s * stride_kt + offs_d[None, :] * stride_kd, offs_s, offs_d,
                       HEAD_DIM, D_PAD, False, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale2)                     # base-2 running max (scale2 > 0)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * scale2 - m_new[:, None])                           # one FMA per element
        l_i = l_i * alpha + tl.sum(p, 1)
        # distance numerator, off-band part: sum_s p * (m0 - s), every (m0 - s) > 0
        d_acc = d_acc * alpha + tl.sum(p * (m0 - offs_s).to(tl.float32)[None, :], 1)
        if HAS_V:
            v = _load_tile(v_base + rows_s * stride_vt + offs_d[None, :] * stride_vd, offs_s, offs_d,
                           HEAD_DIM, D_PAD, False, UPCAST)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i, d_acc


@triton.jit
def _stats_onband(acc, m_i, l_i, d_acc, w_acc, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                  lo, hi, seg_end, window, scale2, offs_m, offs_n, offs_d,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_V: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi): the W-band and the diagonal. Causal and segment-end masks; W-band weights."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_s = n0 + offs_n
        key_ok = offs_s < seg_end
        rows_s = offs_s.to(tl.int64)[:, None]
        k = _load_tile(k_base + rows_s * stride_kt + offs_d[None, :] * stride_kd, key_ok, offs_d,
                       HEAD_DIM, D_PAD, True, UPCAST)
        lag = offs_m[:, None] - offs_s[None, :]                               # t - s
        valid = (lag >= 0) & key_ok[None, :]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale2)   # finite: the first block visited holds key <= m0 <= t
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * scale2 - m_new[:, None])                             # 0 where masked
        l_i = l_i * alpha + tl.sum(p, 1)
        d_acc = d_acc * alpha + tl.sum(p * lag.to(tl.float32), 1)            # p * (t - s), >= 0
        w_acc = w_acc * alpha + tl.sum(p * tl.maximum(window - lag, 0).to(tl.float32), 1)  # p * (W - (t-s))+
        if HAS_V:
            v = _load_tile(v_base + rows_s * stride_vt + offs_d[None, :] * stride_vd, key_ok, offs_d,
                           HEAD_DIM, D_PAD, True, UPCAST)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i, d_acc, w_acc


# Runtime ints that vary between calls are not specialized (Triton would compile a variant for every value
# equal to 1 or divisible by 16); strides are, so the unit head-dim stride keeps vectorized loads.
@triton.jit(do_not_specialize=["table_off_small", "table_off_large", "n_q_heads", "group", "window", "len_key"])
def _stats_kernel(Q, K, V, Out, Lse, Dist, Waad, Table, table_off_small, table_off_large,
                  stride_qb, stride_qh, stride_qt, stride_qd,
                  stride_kb, stride_kh, stride_kt, stride_kd,
                  stride_vb, stride_vh, stride_vt, stride_vd,
                  stride_ob, stride_oh, stride_ot, stride_od,
                  stride_mb, stride_mh,
                  n_q_heads, group, window, scale2, len_key,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_V: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PREC: tl.constexpr, SMALL_M: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Q [B, Hq, T, D], K/V [B, Hkv, T, D] (any strides); Out [B, T, Hq, D]; Lse/Dist/Waad fp32 [B, Hq, T]
    (unit stride on T). Table int32 [n, 4] = (batch, seg_start, seg_end, block_start), the rows for this
    BLOCK_M starting at table_off_small (BLOCK_M == SMALL_M) or table_off_large."""
    pid = tl.program_id(0)
    head = pid % n_q_heads
    entry = pid // n_q_heads
    if BLOCK_M == SMALL_M:
        entry += table_off_small
    else:
        entry += table_off_large
    row = Table + entry.to(tl.int64) * 4
    batch = tl.load(row).to(tl.int64)
    seg_start = tl.load(row + 1)
    seg_end = tl.load(row + 2)
    m0 = tl.load(row + 3)
    kv_head = (head // group).to(tl.int64)
    head64 = head.to(tl.int64)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < seg_end

    q_ptrs = Q + batch * stride_qb + head64 * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qt \
        + offs_d[None, :] * stride_qd
    q = _load_tile(q_ptrs, row_ok, offs_d, HEAD_DIM, D_PAD, True, UPCAST)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    d_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    w_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # off-band: whole key blocks with s <= m0 - W (so t - s >= W for every row t >= m0)
    off_end = seg_start + (tl.maximum(m0 - window + 1 - seg_start, 0) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i, d_acc = _stats_offband(acc, m_i, l_i, d_acc, q, k_base, v_base, stride_kt, stride_kd,
                                          stride_vt, stride_vd, seg_start, off_end, m0, scale2, offs_n, offs_d,
                                          HEAD_DIM, D_PAD, HAS_V, UPCAST, DOT_PREC, BLOCK_N)
    # sum p * (m0 - s) + (t - m0) * sum p = sum p * (t - s); both terms >= 0
    d_acc += (offs_m - m0).to(tl.float32) * l_i
    # on-band: the rest up to the diagonal (keys past the block's last row are never visited)
    on_end = tl.minimum(m0 + BLOCK_M, seg_end)
    acc, m_i, l_i, d_acc, w_acc = _stats_onband(acc, m_i, l_i, d_acc, w_acc, q, k_base, v_base, stride_kt,
                                                stride_kd, stride_vt, stride_vd, off_end, on_end, seg_end,
                                                window, scale2, offs_m, offs_n, offs_d,
                                                HEAD_DIM, D_PAD, HAS_V, UPCAST, DOT_PREC, BLOCK_N)

    inv_l = 1.0 / l_i
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453                          # back to natural log
    dist = d_acc * inv_l
    # waad = W - band / l; rounding may leave it a hair outside [0, min(W, distance)]: clip to the exact range
    waad = tl.minimum(tl.maximum(window - w_acc * inv_l, 0.0), dist)
    m_off = batch * stride_mb + head64 * stride_mh + offs_m.to(tl.int64)
    tl.store(Lse + m_off, lse, mask=row_ok)
    tl.store(Dist + m_off, dist, mask=row_ok)
    tl.store(Waad + m_off, waad, mask=row_ok)
    if HAS_V:
        o = acc * inv_l[:, None]
        o_ptrs = Out + batch * stride_ob + head64 * stride_oh + offs_m.to(tl.int64)[:, None] * stride_ot \
            + offs_d[None, :] * stride_od
        if HEAD_DIM == D_PAD:
            tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])
        else:
            tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


_stats_kernel_tuned = triton.autotune(configs=STATS_CONFIGS, key=["len_key", "HEAD_DIM", "HAS_V"])(_stats_kernel)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------
def stats_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, segments, *, window: int,
               scale: float, config: dict | None = None, table_sizes: tuple | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the stats pass.

    q [B, Hq, T, D], k/v [B, Hkv, T, D] (same dtype, any strides), segments: ``Segments``.
    Returns lse, distance, waad (float32 [B, Hq, T], 0 on padding) and out ([B, T, Hq, D], q.dtype, 0 on
    padding rows) or None when v is None (then the PV product is compiled out).
    ``config`` / ``table_sizes`` (tests): a fixed {BLOCK_M, BLOCK_N, num_warps, num_stages} and the BLOCK_M
    sizes to build the block table for (default: just config's), instead of the default / autotuned setup.
    """
    batch, q_heads, length, dim = q.shape
    d_pad = max(16, triton.next_power_of_2(dim))
    covered = sum(e - s for _, s, e, _ in segments.host) == batch * length
    alloc = torch.empty if covered else torch.zeros
    lse = alloc(batch, q_heads, length, dtype=torch.float32, device=q.device)
    dist, waad = alloc(lse.shape, dtype=torch.float32, device=q.device), alloc(lse.shape, dtype=torch.float32,
                                                                                  device=q.device)
    has_v = v is not None
    out = alloc(batch, length, q_heads, dim, dtype=q.dtype, device=q.device) if has_v else None
    v_arg, out_arg = (v, out) if has_v else (k, lse)           # dummies, never touched when HAS_V is False
    v_strides = v.stride() if has_v else (0, 0, 0, 0)
    # out is [B, T, Hq, D]: strides in the kernel's (b, h, t, d) order
    o_strides = (out.stride(0), out.stride(2), out.stride(1), out.stride(3)) if has_v else (0, 0, 0, 0)

    # fp32 and D = 256 always take their default config: the tuned tiles spill registers there
    if config is None and autotune_enabled() and q.dtype != torch.float32 and d_pad < 256:
        block_ms = GPU_BLOCK_MS
        launch = _stats_kernel_tuned
        meta = {}
    else:
        meta = dict(config) if config is not None else default_stats_config(d_pad, q.dtype)
        block_ms = tuple(table_sizes) if table_sizes else (meta["BLOCK_M"],)
        launch = _stats_kernel
    table, offsets = stats_block_table(segments.host, block_ms, q.device)
    small = block_ms[0]
    off_small = offsets[small][0]
    off_large = offsets[block_ms[-1]][0]
    grid = lambda META: (offsets[META["BLOCK_M"]][1] * q_heads,)  # noqa: E731

    upcast = interpreting()
    dot_prec = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"
    launch[grid](
        q, k, v_arg, out_arg, lse, dist, waad, table, off_small, off_large,
        *q.stride(), *k.stride(), *v_strides, *o_strides,
        lse.stride(0), lse.stride(1),
        q_heads, q_heads // k.shape[1], int(window), float(scale) * LOG2E,
        triton.next_power_of_2(max(segments.max_len, 1)),
        HEAD_DIM=dim, D_PAD=d_pad, HAS_V=has_v, UPCAST=upcast, DOT_PREC=dot_prec, SMALL_M=small,
        **meta,
    )
    return lse, dist, waad, out
