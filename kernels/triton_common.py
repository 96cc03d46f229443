"""What the two Triton passes share; each pass module keeps only its own loops, configs and block-table rows.

    interpreter   ``interpreting()``: the one TRITON_INTERPRET check; importing this module under the
                  interpreter installs the numpy >= 2.4 fix (``_patch_interpreter_scalar_index``) and the
                  GPU's element-wise fp32 dot order (``_patch_interpreter_dot``)
    launch plan   ``launch_plan``: head-dim padding, the autotuned or the default / given config (the one rule
                  for when to autotune: ``autotunes``), the block table (sorted by work, cached on the device),
                  the dot precision and the interpreter's fp32 upcast, as the kernels' constexprs
    tiles         ``load_rows`` [rows, D_PAD] and ``load_cols`` [D_PAD, cols], zero outside the real rows and
                  head dim; ``table_row``: a program's block-table row
    logits        ``layer_scores2``: S2' = scale * log2(e) * q.k, softcapped; ``layer_args``: the kernels' view
                  of a ``LayerAttention``

Block tables: one int32 row per program (its batch row, segment and block start, and what else the pass
needs), for every block size a config can pick (at most two: the kernels address a small and a large one),
sorted by work (descending, stable), so the long segments' late blocks start first (longest-processing-time
order) and a packed batch is not sized by the longest sequence times the number of segments.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------
# Interpreter
# ----------------------------------------------------------------------------------------------------------
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


def _patch_interpreter_dot() -> None:
    """Interpreter-only: an fp32 ``tl.dot`` computed as the GPU's IEEE fp32 dot computes it, one fused
    multiply-add per k in order, acc = fma(a[m, k], b[k, n], acc) for k = 0..K-1, instead of one numpy matmul.

    Why: the influence pass recomputes the stats pass's S2 and needs it bitwise (A = 2^(S2 - m - log2 l), m one
    of the row's own S2 values; an ulp of |S2| off is |S2| * 8e-8 relative in every A, 1.7e-4 at |S| = 1500).
    The GPU's FMA dot gives every element from its two operand vectors alone. numpy's OpenBLAS does not with
    some kernels (Haswell and Zen, chosen by the CPU or OPENBLAS_CORETYPE): an element's rounding depends on
    its position in the tile and on which operand is which, so the two passes' S2 differed by an ulp and fai
    missed section 7 by 10-100x at logits above a thousand on those machines. The fma is emulated in fp64
    (the product of two fp32 values is exact there; the sum rounds once to fp64, then to fp32). Compiled
    kernels are untouched; fp16/bf16 operands (none under the interpreter: UPCAST) keep numpy's matmul."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_rhythm_ordered_dot", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (a.data.dtype == b.data.dtype == d.data.dtype == np.float32):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        a64, b64 = a.data.astype(np.float64), b.data.astype(np.float64)
        acc = np.array(d.data, dtype=np.float32)
        for i in range(a64.shape[-1]):
            acc = (acc + a64[..., :, i, None] * b64[..., None, i, :]).astype(np.float32)
        return interpreter.TensorHandle(acc, d.dtype.scalar)

    builder.create_dot = create_dot
    builder._rhythm_ordered_dot = True


if interpreting():
    _patch_interpreter_scalar_index()
    _patch_interpreter_dot()


# ----------------------------------------------------------------------------------------------------------
# Launch plan
# ----------------------------------------------------------------------------------------------------------
def prescaled(dtype: torch.dtype) -> bool:
    """fp32 inputs: both passes multiply q by scale * log2(e) before the dot, so the dot gives the base-2 logits
    S2 directly and the influence pass recomputes bitwise the S2 the stats pass saw (an FMA of q.k * scale - m
    would not round like the stats pass's product). fp16/bf16 q would lose precision if scaled in its dtype:
    there the scale multiplies the fp32 dot result."""
    return dtype == torch.float32


def head_dim_pad(dim: int) -> int:
    """The head dim the tiles use: the next power of two, at least 16 (tl.dot's minimum); loads mask the rest."""
    return max(16, triton.next_power_of_2(dim))


def length_key(longest: int) -> int:
    """The autotuner's length bucket: the next power of two of the longest segment (at least 1)."""
    return triton.next_power_of_2(max(longest, 1))


def autotune_enabled() -> bool:
    """GPU autotuning is on unless RHYTHM_TRITON_AUTOTUNE=0 (the test suite turns it off to save compiles)."""
    return not interpreting() and os.environ.get("RHYTHM_TRITON_AUTOTUNE", "1") != "0"


def autotunes(dtype: torch.dtype, dim: int, v_dim: int | None = None) -> bool:
    """The one rule for when a launch autotunes: on GPU with autotuning on, for fp16/bf16 at D <= 128 (and v,
    when the pass reads it, of the same head dim). fp32 and D > 128 (padded to 256) always take the pass's
    default config: the tuned tiles spill registers there. A v head dim Dv != D (MLA) takes it too: the
    autotune key and the pinned-config file name one head dim."""
    return (autotune_enabled() and dtype != torch.float32 and head_dim_pad(dim) < 256
            and (v_dim is None or v_dim == dim))


class PassSpec(NamedTuple):
    """What a pass tells ``launch_plan`` about itself (fixed per pass)."""

    name: str                                   # "stats" / "influence": the block table's cache key
    block_key: str                              # the config key whose size the table is built for (BLOCK_M / BLOCK_N)
    tuned_blocks: tuple                         # the block sizes among the pass's autotune configs (at most two)
    default_config: Callable[[int, torch.dtype], dict]   # (d_pad, dtype) -> the config without autotuning
    width: int                                  # ints per block-table row


class LaunchPlan(NamedTuple):
    """How to launch a pass: ``plan.kernel[plan.grid(per_row)](..., **plan.constexprs, **plan.meta)``."""

    kernel: object          # the JITFunction, or its autotuner
    meta: dict              # the fixed config ({} when autotuning)
    table: torch.Tensor     # int32 [n, width] on the device: the rows of every block size, one after the other
    offsets: dict           # {block size: (first row, row count)}
    off_small: int          # first row of the small block size's rows (table_off_small)
    off_large: int          # first row of the large one's (the same rows when there is one size)
    constexprs: dict        # HEAD_DIM, D_PAD, UPCAST, PRESCALE, DOT_PREC, SMALL_BLOCK (and V_DIM, DV_PAD)
    block_key: str          # the config key of the table's block size (PassSpec.block_key)

    @property
    def programs(self) -> int:
        """Block-table rows over every block size (0: nothing to launch)."""
        return sum(count for _, count in self.offsets.values())

    def grid(self, per_row: Callable[[dict], int]):
        """The launch grid: (rows of the config's block size * per_row(META),), per_row = programs per row."""
        return lambda META: (self.offsets[META[self.block_key]][1] * per_row(META),)


def launch_plan(spec: PassSpec, fixed, tuned, q: torch.Tensor, table_rows: Callable[[int], list],
                table_key: tuple, config: dict | None = None, table_sizes: tuple | None = None,
                v_dim: int | None = None) -> LaunchPlan:
    """The launch plan of one pass over q [B, Hq, T, D] (and, for a pass that reads v, its head dim v_dim:
    then the constexprs hold V_DIM and its padding DV_PAD, and the default config is the one of the larger
    padded head dim).

    fixed / tuned: the pass's kernel and its autotuner (looked up by the caller at call time).
    table_rows(block) -> [(work, *row)]: the pass's block-table entries for one block size (work: what the
    program visits, for the order). table_key: what the entries depend on besides the block sizes (the
    segments' spans, the horizon), for the cache. config / table_sizes (tests, pinned configs): a fixed
    config and the block sizes to build the table for (default: just the config's) instead of autotuning.
    """
    dim = q.shape[-1]
    d_pad = head_dim_pad(dim)
    if config is None and autotunes(q.dtype, dim, v_dim):
        kernel, meta, blocks = tuned, {}, tuple(spec.tuned_blocks)
    else:
        widest = d_pad if v_dim is None else max(d_pad, head_dim_pad(v_dim))
        meta = dict(config) if config is not None else spec.default_config(widest, q.dtype)
        kernel, blocks = fixed, (tuple(table_sizes) if table_sizes else (meta[spec.block_key],))
    table, offsets = cached_device_table((spec.name, table_key, blocks), lambda: sorted_table(blocks, table_rows),
                                         spec.width, q.device)
    upcast = interpreting()                 # the interpreter's dots run in fp32 (numpy has no bf16 matmul)
    constexprs = dict(HEAD_DIM=dim, D_PAD=d_pad, UPCAST=upcast, PRESCALE=prescaled(q.dtype),
                      DOT_PREC="ieee" if (q.dtype == torch.float32 or upcast) else "tf32", SMALL_BLOCK=blocks[0])
    if v_dim is not None:
        constexprs.update(V_DIM=v_dim, DV_PAD=head_dim_pad(v_dim))
    return LaunchPlan(kernel, meta, table, offsets, offsets[blocks[0]][0], offsets[blocks[-1]][0], constexprs,
                      spec.block_key)


def sorted_table(blocks: tuple, table_rows: Callable[[int], list]) -> tuple[list, dict]:
    """(rows, {block: (offset, count)}): per block size its entries sorted by work, descending (stable: ties
    keep segment order), the work column dropped."""
    rows, offsets = [], {}
    for block in blocks:
        entries = sorted(table_rows(block), key=lambda e: -e[0])
        offsets[block] = (len(rows), len(entries))
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


# ----------------------------------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def table_row(Table, entry, table_off_small, table_off_large, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
              SMALL_BLOCK: tl.constexpr):
    """Pointer to the program's block-table row: entry counts from the first row of its block size's rows."""
    if BLOCK == SMALL_BLOCK:
        entry += table_off_small
    else:
        entry += table_off_large
    return Table + entry.to(tl.int64) * WIDTH


@triton.jit
def load_rows(ptrs, rows_ok, offs_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROW_MASK: tl.constexpr,
              UPCAST: tl.constexpr):
    """Load a [rows, D_PAD] tile, zero outside the real rows (ROW_MASK) / head dim; fp32 right away under UPCAST."""
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
def load_cols(ptrs, cols_ok, offs_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, COL_MASK: tl.constexpr,
              UPCAST: tl.constexpr):
    """Load a transposed [D_PAD, cols] tile (ptrs laid out that way), zero outside the real columns (COL_MASK)
    / head dim; fp32 right away under UPCAST.

    The stats pass reads K^T and the influence pass Q^T this way (as the Triton tutorial's K block pointer with
    order (0, 1)) rather than tl.trans of a [cols, D] tile: then the stats dot q K^T and the influence pass's
    K Q^T reduce the same products in the same order, also under the interpreter (numpy rounds a matmul with
    a transposed view differently), so both passes see bitwise the same scores."""
    if COL_MASK:
        if HEAD_DIM == D_PAD:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=cols_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == D_PAD:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


# ----------------------------------------------------------------------------------------------------------
# Logits of a layer
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _scores2(qk, scale2, PRESCALE: tl.constexpr):
    """Base-2 logits S2 = scale * log2(e) * q.k of a q.k tile. PRESCALE (fp32 inputs): q was multiplied by
    scale2 before the dot, so the dot result already is S2 (no rounded product to redo in the influence pass)."""
    if PRESCALE:
        return qk
    else:
        return qk * scale2


@triton.jit
def _softcap2(s2, cap2, neg_two_over_cap):
    """Softcapping in base 2: cap * tanh(S / cap) in log2(e) units is cap2 * tanh(S2 / cap2), cap2 =
    cap * log2(e); x = S2 / cap2 = S / cap. Two forms, each with a relative error of a few fp32 ulps of the
    result (exp2 and arithmetic only, so the interpreter and the GPU run the same formula):

        |x| <  1/4:  S2 * (tanh(x) / x),  tanh(x) / x = 1 - x^2/3 + 2x^4/15 - 17x^6/315 + 62x^8/2835
                     - 1382x^10/155925 (Taylor; the next term is 2e-10 at |x| = 1/4): for a huge cap the
                     ratio is exactly 1 and S2' = S2
        |x| >= 1/4:  sign(x) * cap2 * (1 - e) / (1 + e),  e = 2^(-2 log2(e) |x|) = 2^(|S2| * neg_two_over_cap)
                     (neg_two_over_cap = -2 / cap), e <= 0.61 so 1 - e does not cancel

    The single form (1 - e) / (1 + e) everywhere lost the relative precision of 1 - e near 0: an absolute
    error of a few ulps of 1, times cap2 in the logit, so lse was 1.6e-4 off at a cap of 1e4, 1.7e-2 at 1e6
    and NaN at 3e38. Apply before masking (-inf -> -cap2)."""
    x = s2 / cap2
    x2 = x * x
    ratio = 1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197))))
    e = tl.exp2(tl.abs(s2) * neg_two_over_cap)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x2 < 0.0625, s2 * ratio, tl.where(s2 < 0, -t, t) * cap2)


@triton.jit
def layer_scores2(qk, scale2, cap2, neg_two_over_cap, PRESCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """The layer's base-2 logits S2' of a q.k tile: scaled, then softcapped when SOFTCAP."""
    s2 = _scores2(qk, scale2, PRESCALE)
    if SOFTCAP:
        s2 = _softcap2(s2, cap2, neg_two_over_cap)
    return s2


class LayerArgs(NamedTuple):
    """The kernels' view of a ``LayerAttention``: runtime values and the constexpr flags that compile each
    mechanism in only when used (plain causal attention runs the same code as without a layer)."""

    sliding: int            # the window w (0 when unused)
    chunk: int              # the chunk size c (0 when unused)
    cap2: float             # softcap * log2(e) (1.0 when unused)
    neg_two_over_cap: float  # -2 / softcap, the exponent factor of tanh in base 2 (-1.0 when unused)
    sinks2: torch.Tensor | None   # fp32 [Hq] sink logits * log2(e), or None
    flags: dict             # HAS_SLIDING, HAS_CHUNK, VISIBLE, SOFTCAP, HAS_SINKS


def layer_args(layer, longest: int, device: torch.device) -> LayerArgs:
    """LayerAttention (or None) -> LayerArgs. A window or chunk at least the longest segment hides no key
    (t - s < len <= w; every row's chunk starts at the segment start), so it is dropped here: plain code,
    and no int32 overflow of t - w + 1."""
    sliding = getattr(layer, "sliding_window", None) if layer is not None else None
    chunk = getattr(layer, "chunk_size", None) if layer is not None else None
    softcap = getattr(layer, "softcap", None) if layer is not None else None
    sinks = getattr(layer, "sinks", None) if layer is not None else None
    sliding = None if sliding is None or sliding >= longest else int(sliding)
    chunk = None if chunk is None or chunk >= longest else int(chunk)
    sinks2 = None if sinks is None else (sinks.detach().to(device=device, dtype=torch.float32) * LOG2E).contiguous()
    flags = dict(HAS_SLIDING=sliding is not None, HAS_CHUNK=chunk is not None,
                 VISIBLE=sliding is not None or chunk is not None, SOFTCAP=softcap is not None,
                 HAS_SINKS=sinks is not None)
    # -2 / cap stays a finite fp32 for any cap > 0 (0 * -inf would be NaN at S = 0)
    return LayerArgs(sliding or 0, chunk or 0, 1.0 if softcap is None else float(softcap) * LOG2E,
                     -1.0 if softcap is None else max(-2.0 / float(softcap), -3.0e38), sinks2, flags)
