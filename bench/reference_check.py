"""An independent reference for the GPU check: the metrics of one causal sequence, computed from the
definitions (docs/definitions.md section 2) over blocks of query rows, and the section 7 comparison.

Shares no code with the kernels or the oracle in kernels/naive.py: the masks, |T(s)| and the sums are written
out here again. Memory stays at about ``budget`` score entries (rows x keys x heads) at a time, so the same
function serves T = 2K (one block) and T = 32K (row blocks) and never holds a T x T map per head.

    S[t,s] = scale * q_t . k_s (s <= t)      A = softmax over s <= t      lag = t - s
    lse[t] = log sum_s exp S[t,s]   distance[t] = sum_s A * lag   waad[t] = sum_s A * min(lag, W)
    fai[s] = (1/|T(s)|) sum_{t in T(s)} A[t,s],  T(s) = {t >= response_start : H_lo <= t - s <= H_hi, t < T}
    out[t] = sum_s A[t,s] v_s                 (with v; v's head dim Dv may differ from D)
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


@torch.no_grad()
def reference_metrics(q: torch.Tensor, k: torch.Tensor, *, scale: float, window: int, horizons: dict,
                      response_start: int = 0, compute_dtype=torch.float64, budget: int = 1 << 29,
                      v: torch.Tensor | None = None) -> dict:
    """q [1, Hq, T, D], k [1, Hkv, T, D], v None or [1, Hkv, T, Dv] (one sequence, no padding). Every product, softmax and sum runs in
    ``compute_dtype`` (float64: the exact reference; the input's bf16/fp16: section 7's low-precision one);
    fai's column sums are carried across row blocks in float32 at least.

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


def fp32_bound(name: str, want: torch.Tensor) -> torch.Tensor:
    """Section 7 for fp32 inputs, per element (waad: 1e-4 absolute up to 64, relative past it); the attention
    output (not a section 7 metric) within 1e-4 absolute, as the test suite holds it."""
    if name == "out":
        return torch.full_like(want, 1e-4)
    if name == "waad":
        return 1e-4 * (want.abs() / 64).clamp_min(1)
    if name == "distance":
        return 1e-4 * want.abs().clamp_min(1)
    return 1e-6 + 1e-4 * want.abs()                                                # lse, fai


def compare(ours: dict, ref64: dict, ref_lp: dict | None, input_dtype) -> dict:
    """Section 7 check of each metric in ``ours`` ({ref name: tensor [Hq, T]}, "out" [Hq, T, Dv]) against the
    references.

    fp32 inputs: worst per-element error / bound. fp16/bf16 inputs: max error / (2 * max |ref_lp - ref64| +
    1e-5 * (1 + max |ref64|)). "ratio" <= 1 passes; NaN or Inf in ours fails (ratio inf).
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
            entry["ratio"] = (err / fp32_bound("fai" if key == "fai" else key, want)).max().item()
        else:
            low = ref_lp[name].double()
            bound = 2 * (low - want).abs().max().item() + 1e-5 * (1 + want.abs().max().item())
            entry.update(bound=bound, ratio=entry["max_abs_err"] / bound)
        entry["ok"] = entry["ratio"] <= 1.0
        result[name] = entry
    return result
