"""The tests' own oracle: every metric from the definitions (docs/definitions.md sections 1, 2 and 7), by
brute force, sharing no code with ``rhythm_kernels`` or ``rhythm``.

The segment layout (where each sequence's real tokens and response start), the attending-row counts |T(s)|
and ``fai_valid`` are recomputed here with plain Python loops from the raw ``attention_mask`` /
``cu_seqlens`` / ``response_start`` the caller passed; the attention matrix of each sequence is materialised
in ``compute_dtype``. A bug in the package's segment builders or in ``influence_counts`` therefore shows up as a
mismatch instead of being shared by both sides of the comparison.

    S[t,s] = scale * q_t . k_s  (then softcap * tanh(S / softcap) with a softcap)
    visible(t, s) = start <= s <= t, t - s < sliding_window, same chunk (by offset from the segment start)
    lse[t] = log(exp(sink) + sum_{visible s} exp(S[t,s]))        A[t,s] = exp(S[t,s] - lse[t]) on visible keys
    distance[t] = sum_s A (t - s)      waad[t] = sum_s A min(t - s, W)
    fai[s] = (1 / |T(s)|) sum_{t in T(s)} A[t,s],  T(s) = {t >= response start : s + H_lo <= t <= min(end-1, s + H_hi)}

The fp32 contract is conditioning-aware (docs/definitions.md section 7): besides the fp64 reference, a second
one rounds the scores S to fp32 (a sequential sum over D of IEEE-rounded products: the same bits on every
machine, no BLAS) and computes everything after them in fp64; its distance from the fp64 one measures what
the rounding of the fp32 scores alone costs on these inputs, and the bound grows by twice that.
"""
from __future__ import annotations

import torch

METRICS = ("lse", "distance", "waad", "fai")


def random_qkv(batch, q_heads, kv_heads, length, dim, *, dtype=torch.float32, device="cpu", seed=0,
               with_v=False, spread=1.5, v_dim=None):
    """q, k (and v) with scores of standard deviation about spread**2: peaked, non-uniform attention.
    v_dim: v's head dim (default dim; MLA: 128 beside q/k's 192)."""
    gen = torch.Generator().manual_seed(seed)
    make = lambda heads: (torch.randn(batch, heads, length, dim, generator=gen) * spread)  # noqa: E731
    q, k = make(q_heads), make(kv_heads)
    v = torch.randn(batch, kv_heads, length, v_dim or dim, generator=gen) if with_v else None
    cast = lambda x: None if x is None else x.to(dtype=dtype, device=device)  # noqa: E731
    return cast(q), cast(k), cast(v)


def _ints(x, n):
    """response_start as n Python ints (None -> None)."""
    if x is None:
        return None
    if isinstance(x, int):
        return [x] * n
    values = [int(v) for v in torch.as_tensor(x).reshape(-1).tolist()]
    assert len(values) == n, f"response_start has {len(values)} entries for {n} sequences"
    return values


def brute_force_layout(batch, length, attention_mask=None, response_start=None, cu_seqlens=None):
    """[(row, start, end, response_start)] from the raw arguments, one Python loop per row.

    A padded row's real span is the run of mask entries that are 1/True; an absent response start means the
    whole span is response. With cu_seqlens (B = 1) each [cu[i], cu[i+1]) is a sequence.
    """
    if cu_seqlens is not None:
        bounds = [int(v) for v in torch.as_tensor(cu_seqlens).tolist()]
        spans = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    else:
        spans = []
        for b in range(batch):
            row = [True] * length if attention_mask is None else [bool(v) for v in attention_mask[b].tolist()]
            real = [t for t in range(length) if row[t]]
            start, end = (real[0], real[-1] + 1) if real else (0, 0)
            assert real == list(range(start, end)), "the oracle expects one contiguous real span per row"
            spans.append((b, start, end))
    starts = _ints(response_start, len(spans))
    return [(b, s, e, s if starts is None else starts[i]) for i, (b, s, e) in enumerate(spans)]


def brute_force_count(s, end, resp, horizon):
    """|T(s)|: response rows t (t >= resp) with s + H_lo <= t <= min(end - 1, s + H_hi)."""
    h_lo, h_hi = horizon
    last = end - 1 if h_hi is None else min(end - 1, s + h_hi)
    return sum(1 for t in range(s + h_lo, last + 1) if t >= resp)


def _visible(n, layer, device):
    """bool [n, n]: visible[t, s] inside one segment (positions relative to its start)."""
    t = torch.arange(n, device=device)
    lag = t[:, None] - t[None, :]
    visible = lag >= 0
    window = getattr(layer, "sliding_window", None) if layer is not None else None
    chunk = getattr(layer, "chunk_size", None) if layer is not None else None
    if window is not None:
        visible &= lag < int(window)
    if chunk is not None:
        visible &= (t[:, None] // int(chunk)) == (t[None, :] // int(chunk))
    return visible, lag


def fp32_scores(qs, ks, scale):
    """S = scale * q . k^T in fp32 in a fixed order: acc += q_d * k_d for d = 0..D-1, every product and sum
    IEEE-rounded to fp32 (no FMA, no BLAS), so the same bits on every machine. qs [H, n, D], ks [H, m, D]
    (any float dtype, exact in fp32) -> float32 [H, n, m]."""
    q32, k32 = qs.to(torch.float32), ks.to(torch.float32)
    acc = torch.zeros(q32.shape[0], q32.shape[1], k32.shape[1], dtype=torch.float32, device=q32.device)
    for d in range(q32.shape[-1]):
        acc += q32[:, :, d, None] * k32[:, None, :, d]
    return acc * torch.tensor(scale, dtype=torch.float32)


def oracle(q, k, v, *, window=10, horizon=(10, 100), scale=None, attention_mask=None, response_start=None,
           cu_seqlens=None, layer=None, compute_dtype=torch.float64, scores_dtype=None):
    """Materialised metrics of one layer from the definitions.

    q [B, Hq, T, D], k/v [B, Hkv, T, D]; layer: anything with ``sliding_window``, ``chunk_size``,
    ``softcap``, ``sinks`` ([Hq]) attributes, or None for plain causal attention. scores_dtype=torch.float32:
    the scores are rounded to fp32 first (``fp32_scores``), everything after them in compute_dtype (the
    conditioning reference of section 7). Returns lse, distance,
    waad, fai ([B, Hq, T] in compute_dtype, 0 on padding), fai_valid (bool [B, Hq, T]) and out
    ([B, T, Hq, Dv]) when v is given.
    """
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    h_lo, h_hi = horizon
    softcap = getattr(layer, "softcap", None) if layer is not None else None
    sinks = getattr(layer, "sinks", None) if layer is not None else None
    result = {name: torch.zeros(batch, heads, length, dtype=compute_dtype) for name in METRICS}
    result["fai_valid"] = torch.zeros(batch, heads, length, dtype=torch.bool)
    if v is not None:
        result["out"] = torch.zeros(batch, length, heads, v.shape[-1], dtype=compute_dtype)
    for b, start, end, resp in brute_force_layout(batch, length, attention_mask, response_start, cu_seqlens):
        n = end - start
        if n == 0:
            continue
        qs = q[b, :, start:end].cpu().to(compute_dtype)
        ks = k[b, :, start:end].cpu().to(compute_dtype).repeat_interleave(group, dim=0)
        if scores_dtype == torch.float32:
            scores = fp32_scores(qs, ks, scale).to(compute_dtype)                 # [Hq, n, n]
        else:
            scores = (qs @ ks.transpose(-1, -2)) * scale                          # [Hq, n, n]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        visible, lag = _visible(n, layer, scores.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = torch.as_tensor(sinks).cpu().to(compute_dtype)[:, None, None].expand(heads, n, 1)
            lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)
        else:
            lse = torch.logsumexp(scores, dim=-1)
        # A = exp(S - lse): 0 on invisible keys; rows sum to 1 - exp(sink - lse) with a sink. Without sinks the
        # plain softmax, so the low-precision reference does what an fp16/bf16 softmax does.
        attn = torch.exp(scores - lse[..., None]) if sinks is not None else torch.softmax(scores, dim=-1)
        lag_nonneg = lag.clamp_min(0).to(compute_dtype)
        result["lse"][b, :, start:end] = lse
        result["distance"][b, :, start:end] = (attn * lag_nonneg).sum(-1)
        result["waad"][b, :, start:end] = (attn * lag.clamp(0, window).to(compute_dtype)).sum(-1)
        rows = torch.arange(n)[:, None] + start                               # absolute row index t
        band = (lag >= h_lo) & (rows >= resp)
        if h_hi is not None:
            band &= lag <= h_hi
        column_sums = (attn * band.to(compute_dtype)).sum(dim=-2)               # [Hq, n]
        for s in range(n):
            count = brute_force_count(start + s, end, resp, horizon)
            if count:
                result["fai"][b, :, start + s] = column_sums[:, s] / count
                result["fai_valid"][b, :, start + s] = True
        if v is not None:
            vs = v[b, :, start:end].cpu().to(compute_dtype).repeat_interleave(group, dim=0)
            result["out"][b, start:end] = (attn @ vs).transpose(0, 1)
    return result


def spec7_excess(name, got, want, scores32=None):
    """Largest (error - bound) of one fp32 output against its fp64 reference (<= 0 passes): the one
    section 7 bound helper of the tests.

    Section 7: waad within 1e-4 * max(1, value / 64) (1e-4 absolute up to 64), distance within
    1e-4 * max(1, value), fai and lse within 1e-6 + 1e-4 * value, out within 1e-4; plus, when ``scores32``
    (the same output of the reference with fp32 scores, ``oracle(..., scores_dtype=torch.float32)``) is
    given, 2 * max abs(scores32 - want): what rounding the scores to fp32 alone costs on these inputs.
    """
    got, want = got.double().cpu(), want.double().cpu()
    err = (got - want).abs()
    if not err.numel():
        return 0.0
    if name == "waad":
        bound = 1e-4 * (want.abs() / 64).clamp_min(1)
    elif name == "distance":
        bound = 1e-4 * want.abs().clamp_min(1)
    elif name == "out":
        bound = torch.full_like(want, 1e-4)
    else:
        bound = 1e-6 + 1e-4 * want.abs()
    if scores32 is not None:
        bound = bound + 2 * (scores32.double().cpu() - want).abs().max().item()
    return (err - bound).max().item()


def assert_within_spec7(name, got, want, where="", scores32=None):
    """Assert one fp32 output is within the section 7 bound of its fp64 reference (``spec7_excess``);
    returns the worst absolute error."""
    excess = spec7_excess(name, got, want, scores32)
    err = (got.double().cpu() - want.double().cpu()).abs().max().item() if got.numel() else 0.0
    assert excess <= 0, f"{name}{where}: max error {err:.3g} exceeds the section 7 bound by {excess:.3g}"
    return err


def assert_matches_oracle(metrics, q, k, v=None, **kwargs) -> None:
    """Section 7: fp32 inputs against the fp64 reference, the bound widened by twice the error of the
    reference with fp32 scores (conditioning-aware); fp16/bf16 inputs within 2x the error of the
    low-precision reference (plus a small floor). ``metrics`` has the fields of ``AttentionMetrics``
    (attributes) or is a dict."""
    get = (lambda name: metrics[name]) if isinstance(metrics, dict) else (lambda name: getattr(metrics, name))  # noqa: E731
    ref64 = oracle(q.double(), k.double(), None if v is None else v.double(), **kwargs)
    if "fai_valid" in (metrics if isinstance(metrics, dict) else metrics.__dict__):
        assert torch.equal(get("fai_valid").cpu(), ref64["fai_valid"]), "fai_valid differs from the oracle"
    names = METRICS + (("out",) if v is not None else ())
    if q.dtype == torch.float32:
        ref32 = oracle(q, k, v, scores_dtype=torch.float32, **kwargs)
        for name in names:
            assert_within_spec7(name, get(name), ref64[name], scores32=ref32[name])
        return
    ref_lp = oracle(q, k, v, compute_dtype=q.dtype, **kwargs)
    for name in names:
        got = get(name).double().cpu()
        want, low = ref64[name], ref_lp[name].double()
        bound = 2 * (low - want).abs().max().item() + 1e-5 * (1 + want.abs().max().item())
        err = (got - want).abs().max().item()
        assert err <= bound, f"{name} ({q.dtype}): max error {err:.3g} > bound {bound:.3g}"


# WAAD with a window far beyond the sequence (issue: W - band / l cancels in fp32): every backend must meet
# docs/definitions.md section 7 for every W, and W >= the segment length is plain distance. Shared by the
# torch / reference and the triton tests: (window, layer sliding window or None).
LARGE_WINDOWS = [(100, None), (1000, None), (10 ** 5, None), (10 ** 9, None), (10 ** 9, 100), (300, 64)]


def large_window_case(length=512, seed=41):
    """q, k [2, 4, T, 64] (GQA 2) with moderate scores, and a mask with left and right padding.

    Moderate scores: at W >= T, waad is the distance (up to about T / 2) and the absolute bound 1e-4 leaves
    room only for the rounding of the fp32 scores themselves when the logits stay of order one."""
    q, k, _ = random_qkv(2, 4, 2, length, 64, seed=seed, spread=0.7)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[0, :37] = False
    mask[1, length - 50:] = False
    return q, k, mask


def random_baseline(seed, row_id, prompt_length, response_length, q=0.4, gamma_amp=1.5) -> list[float]:
    """gamma of one response under the random baseline of docs/definitions.md section 4, written out: the
    row's seed is the first 8 bytes of sha256("{seed}\\0{type name of the id}\\0{id}"), little-endian, shifted
    right by one; a CPU torch.Generator with that seed draws float32 keys, draw j for the sequence's j-th token
    (prompt included); the ceil(q |R|) response tokens with the largest keys get gamma_amp (ties to the lower
    position). Returns the response's gammas (length response_length)."""
    import hashlib
    import math

    digest = hashlib.sha256(f"{seed}\0{type(row_id).__name__}\0{row_id}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    keys = torch.rand(prompt_length + response_length, generator=generator)[prompt_length:].tolist()
    ranked = sorted(range(response_length), key=lambda i: (-keys[i], i))
    gamma = [1.0] * response_length
    for i in ranked[:math.ceil(q * response_length)]:
        gamma[i] = float(gamma_amp)
    return gamma
