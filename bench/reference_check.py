"""An independent reference for the GPU check: the metrics of one causal sequence, computed from the
definitions (docs/definitions.md section 2) over blocks of query rows, and the section 7 comparison.

Shares no code with the kernels or the oracle in kernels/naive.py: the masks, |T(s)| and the sums are written
out here again. Memory stays at about ``budget`` score entries (rows x keys x heads) at a time, so the same
function serves T = 2K (one block) and T = 32K (row blocks) and never holds a T x T map per head.

    S[t,s] = scale * q_t . k_s (s <= t)      A = softmax over s <= t      lag = t - s
    lse[t] = log sum_s exp S[t,s]   distance[t] = sum_s A * lag   waad[t] = sum_s A * min(lag, W)
    fai[s] = (1/|T(s)|) sum_{t in T(s)} A[t,s],  T(s) = {t >= response_start : H_lo <= t - s <= H_hi, t < T}
    out[t] = sum_s A[t,s] v_s                 (with v; v's head dim Dv may differ from D)

The fp32 bound is conditioning-aware (section 7): the fixed bound plus twice the error, against the fp64
reference, of a reference whose scores are rounded to fp32 (``fp32_scores``: a fixed sequential order, the
same bits on every machine) and everything after them in fp64.
"""
from __future__ import annotations

import math

import torch

METRICS = ("lse", "distance", "waad")
# What every GPU-check step checks at: W of WAAD and the two horizons of FAI (H_hi None = to the end).
WINDOW = 10
BAND = (10, 100)
FULL = (10, None)


def horizon_counts(length: int, response_start: int, horizon: tuple, device) -> torch.Tensor:
    """|T(s)| for s in [0, T): rows t with max(response_start, s + H_lo) <= t <= min(T - 1, s + H_hi)."""
    s = torch.arange(length, device=device)
    lo = torch.clamp(s + horizon[0], min=response_start)
    hi = torch.full_like(s, length - 1) if horizon[1] is None else torch.clamp(s + horizon[1], max=length - 1)
    return (hi - lo + 1).clamp_min(0)


def fp32_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * q k^T rounded to fp32 in a fixed order: acc += q_d * k_d over d = 0..D-1, each product and sum
    IEEE-rounded (no BLAS, no FMA), so the same bits on every machine. q [..., n, D], k [..., m, D] -> float32
    [..., n, m]."""
    q32, k32 = q.to(torch.float32), k.to(torch.float32)
    acc = torch.zeros(*q32.shape[:-1], k32.shape[-2], dtype=torch.float32, device=q32.device)
    for d in range(q32.shape[-1]):
        acc += q32[..., :, d, None] * k32[..., None, :, d]
    return acc * torch.tensor(scale, dtype=torch.float32, device=q32.device)


@torch.no_grad()
def reference_metrics(q: torch.Tensor, k: torch.Tensor, *, scale: float, window: int, horizons: dict,
                      response_start: int = 0, compute_dtype=torch.float64, budget: int = 1 << 29,
                      v: torch.Tensor | None = None, scores_dtype=None) -> dict:
    """q [1, Hq, T, D], k [1, Hkv, T, D], v None or [1, Hkv, T, Dv] (one sequence, no padding). Every product, softmax and sum runs in
    ``compute_dtype`` (float64: the exact reference; the input's bf16/fp16: section 7's low-precision one);
    fai's column sums are carried across row blocks in float32 at least. scores_dtype=torch.float32: the
    scores are ``fp32_scores`` (the conditioning reference of the fp32 bound), the rest in compute_dtype.

    Returns {"lse", "distance", "waad": [Hq, T]} and {"fai:<name>": [Hq, T]} for each horizon in
    ``horizons`` ({name: (H_lo, H_hi or None)}), and "out": [Hq, T, Dv] with v, all in compute_dtype.
    """
    _, q_heads, length, _ = q.shape
    group = q_heads // k.shape[1]
    qd = q[0].to(compute_dtype)
    kd = k[0].to(compute_dtype).repeat_interleave(group, dim=0)                  # [Hq, T, D]
    out = {name: torch.zeros(q_heads, length, dtype=compute_dtype, device=q.device) for name in METRICS}
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    col = {name: torch.zeros(q_heads, length, dtype=acc_dtype, device=q.device) for name in horizons}
    if v is not None:
        vd = v[0].to(compute_dtype).repeat_interleave(group, dim=0)              # [Hq, T, Dv]
        out["out"] = torch.zeros(q_heads, length, v.shape[-1], dtype=compute_dtype, device=q.device)
    rows_per_block = max(1, min(length, budget // max(1, q_heads * length)))
    for r0 in range(0, length, rows_per_block):
        r1 = min(length, r0 + rows_per_block)
        t = torch.arange(r0, r1, device=q.device)
        s = torch.arange(r1, device=q.device)                                     # keys <= the last row
        lag = t[:, None] - s[None, :]                                              # [rows, keys]
        if scores_dtype == torch.float32:
            scores = fp32_scores(qd[:, r0:r1], kd[:, :r1], scale).to(compute_dtype)
        else:
            scores = torch.matmul(qd[:, r0:r1], kd[:, :r1].transpose(-1, -2)) * scale
        scores.masked_fill_(lag < 0, float("-inf"))
        out["lse"][:, r0:r1] = torch.logsumexp(scores, dim=-1)
        attn = torch.softmax(scores, dim=-1)
        del scores
        out["distance"][:, r0:r1] = (attn * lag.clamp_min(0).to(compute_dtype)).sum(-1)
        out["waad"][:, r0:r1] = (attn * lag.clamp(0, window).to(compute_dtype)).sum(-1)
        for name, (h_lo, h_hi) in horizons.items():
            band = (lag >= h_lo) & (t[:, None] >= response_start)
            if h_hi is not None:
                band &= lag <= h_hi
            col[name][:, :r1] += (attn * band.to(compute_dtype)).sum(-2).to(acc_dtype)
        if v is not None:
            out["out"][:, r0:r1] = torch.matmul(attn, vd[:, :r1])
        del attn
    for name, horizon in horizons.items():
        count = horizon_counts(length, response_start, horizon, q.device)
        sums = col[name].to(compute_dtype)
        out[f"fai:{name}"] = torch.where(count > 0, sums / count.clamp_min(1).to(compute_dtype),
                                         torch.zeros((), dtype=compute_dtype, device=q.device))
    return out


def fp32_bound(name: str, want: torch.Tensor, scores32_error: float = 0.0) -> torch.Tensor:
    """Section 7 for fp32 inputs, per element (waad: 1e-4 absolute up to 64, relative past it; the attention
    output within 1e-4 absolute, as the test suite holds it), plus 2 * scores32_error: the max abs error of the
    same output computed from fp32 scores (``fp32_scores``)."""
    if name == "out":
        fixed = torch.full_like(want, 1e-4)
    elif name == "waad":
        fixed = 1e-4 * (want.abs() / 64).clamp_min(1)
    elif name == "distance":
        fixed = 1e-4 * want.abs().clamp_min(1)
    else:
        fixed = 1e-6 + 1e-4 * want.abs()                                           # lse, fai
    return fixed + 2 * scores32_error


def compare(ours: dict, ref64: dict, ref_lp: dict | None, input_dtype) -> dict:
    """Section 7 check of each metric in ``ours`` ({ref name: tensor [Hq, T]}, "out" [Hq, T, Dv]) against the
    references.

    fp32 inputs: worst per-element error / bound; ref_lp, when given, is the reference with fp32 scores
    (``reference_metrics(..., scores_dtype=torch.float32)``), whose max error widens the bound (section 7).
    fp16/bf16 inputs: max error / (2 * max |ref_lp - ref64| + 1e-5 * (1 + max |ref64|)). "ratio" <= 1 passes;
    NaN or Inf in ours fails (ratio inf).
    Returns {name: {"max_abs_err", "ratio", "ok"} (+ "bound" for fp16/bf16)}.
    """
    result = {}
    for name, got in ours.items():
        want = ref64[name].double()
        got = got.double().reshape(want.shape)
        if not bool(torch.isfinite(got).all()):
            result[name] = {"max_abs_err": math.inf, "ratio": math.inf, "ok": False, "note": "NaN/Inf in output"}
            continue
        err = (got - want).abs()
        entry = {"max_abs_err": err.max().item()}
        if input_dtype == torch.float32:
            key = name.split(":")[0]
            cond = 0.0 if ref_lp is None else (ref_lp[name].double() - want).abs().max().item()
            entry["ratio"] = (err / fp32_bound("fai" if key == "fai" else key, want, cond)).max().item()
        else:
            low = ref_lp[name].double()
            bound = 2 * (low - want).abs().max().item() + 1e-5 * (1 + want.abs().max().item())
            entry.update(bound=bound, ratio=entry["max_abs_err"] / bound)
        entry["ok"] = entry["ratio"] <= 1.0
        result[name] = entry
    return result
