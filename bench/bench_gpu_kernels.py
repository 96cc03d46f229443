"""GPU benchmark of the Triton kernels against torch SDPA (flash) and the eager-maps pipeline, each method's
outputs checked against an fp64 reference in the same run (docs/definitions.md section 7).

bf16, causal, one layer B x Hq x Hkv x D = 1 x 32 x 8 x D (Qwen3-4B's heads), every position a response
position. Shapes run in the order given (``--shapes D:T ...``; default D=128 at T=8192 and 32768, then D=64,
then both and the MLA head dims at 2048). ``D/Dv:T`` gives v its own head dim (DeepSeek MLA: 192/128:T);
SDPA and FlashAttention 2 take one head dim, so for them v is zero-padded to D outside the timing and the
output sliced back (what transformers does for MLA on flash-attention). Per shape and method: CUDA events, 3 warm-ups, median of 10 repeats (5 at T > 8192).

    sdpa_flash          F.scaled_dot_product_attention(is_causal=True) under SDPBackend.FLASH_ATTENTION
    fa2                 flash_attn.flash_attn_func(causal=True), FlashAttention 2 itself, native GQA (only where
                        the optional flash-attn package imports; recorded "unavailable" otherwise)
    stats_with_out      our stats pass with v: lse, distance, waad and the attention output O
    stats_no_out        our stats pass without v (the PV product compiled out)
    influence_band      our influence pass, horizon (10, 100)
    influence_full      our influence pass, horizon (10, None)
    metrics_only        stats_no_out + influence_band (sum of the two medians: what the metrics cost)
    api_metrics_only    rhythm.attention_metrics(backend="triton", validate=False): the same plus host work
    eager_maps          softmax(QK^T) materialised in fp32, then distance/waad/fai read off it ("oom" if so)

Checks: lse, distance, waad and fai of every method against bench/reference_check.py (fp64 and, for bf16
inputs, the bf16 reference that sets the bound), computed over row blocks at every T. Each record holds
max error, error / bound ("ratio", <= 1 passes) and ok; a failing method is recorded, never fatal.
Every measurement is printed and appended to $OUT/results.jsonl at once; $OUT/bench_gpu_kernels.json is
rewritten from it; the autotuner's picks go to $OUT/tuned_configs.json (rhythm_kernels.tuned_configs).

FLOPs (FlashAttention's convention: only the useful entries of the causal triangle, 2 FLOPs per MAC):
    sdpa_flash, fa2, stats_with_out   2 * B * Hq * T^2 * (D + Dv) / 2   (QK^T and PV)
    stats_no_out, influence_full 2 * B * Hq * T^2 * D / 2        (QK^T only; the influence pass recomputes it)
    influence_band               2 * B * Hq * D * (band entries)  (entries with 10 <= t - s <= 100)
    metrics_only, api, eager     stats_no_out + influence_band    (the same useful work, to compare)
Peak memory: torch.cuda.max_memory_allocated() minus the allocation before the call (outputs included).

    python3 bench/bench_gpu_kernels.py [--shapes 128:8192 ...] [--budget-s S]   # CUDA
    python3 bench/bench_gpu_kernels.py --dry-run        # CPU, Triton interpreter, tiny shapes: checks the script

The GPU check's other steps are their own tools: bench/gpu_preflight.py, bench/gpu_warm.py (compile the
variants into the Triton cache), bench/gpu_smoke.py (correctness of the public API); without a GPU,
bench/gpu_compile_report.py (the sm_90 resource report).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from records import describe_machine, gpu_step         # siblings: bench/ is sys.path[0] for this script
from reference_check import BAND, FULL, WINDOW
TARGETS = {"stats_with_out": 1.05, "metrics_only": 0.75, "influence_full": 0.6}
SUMMARY = "bench_gpu_kernels.json"
WHAT = "rhythm Triton kernels vs SDPA flash forward (and FlashAttention 2) and the eager-maps pipeline"
DEFAULT_SHAPES = ["128:8192", "128:32768", "64:8192", "64:32768", "128:2048", "64:2048", "192/128:2048"]
DRY_SHAPES = ["64:96", "64:64", "192/128:48"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1 with tiny shapes")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="D[/Dv]:T",
                        help="head dim (and v's head dim when it differs):length, in order")
    parser.add_argument("--heads", type=int, nargs=2, default=None, metavar=("HQ", "HKV"))
    parser.add_argument("--budget-s", type=float, default=210.0,
                        help="start no new method after this many seconds (the rest is recorded as skipped)")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--no-check", action="store_true", help="time only (no reference)")
    parser.add_argument("--step", default="bench", help="label of this run in the records")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def measure(self, fn, warmup: int, repeats: int) -> dict:
        import torch

        start = time.perf_counter()
        fn()                                                     # first call: compile (or cache load), autotune
        if self.cuda:
            torch.cuda.synchronize()
        first_ms = (time.perf_counter() - start) * 1e3
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return {"ms": statistics.median(times), "ms_min": min(times), "repeats": repeats,
                "first_call_ms": first_ms}

    def peak_and_result(self, fn):
        """One more call: (peak bytes over the allocation before it, or None on CPU; its result)."""
        import torch

        if not self.cuda:
            return None, fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base), result


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------------------
# The methods and what each one's outputs are checked as
# --------------------------------------------------------------------------------------------------------
def _v_padded(q, v):
    """(v zero-padded to q's head dim, Dv, note): SDPA and FlashAttention 2 take one head dim for q, k, v."""
    import torch.nn.functional as F

    v_dim = v.shape[-1]
    if v_dim == q.shape[-1]:
        return v, v_dim, ""
    return F.pad(v, (0, q.shape[-1] - v_dim)), v_dim, f", v zero-padded {v_dim} -> {q.shape[-1]} outside the timing"


def sdpa_flash_fn(q, k, v):
    """SDPA forward under the flash backend. GQA via enable_gqa when the backend takes it, else K/V repeated
    once outside the timed call. Returns (fn, how); fn's output is [B, Hq, T, Dv]."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    v, v_dim, padded = _v_padded(q, v)

    def attempt(kk, vv, gqa):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)[..., :v_dim]

    try:
        attempt(k, v, True)
        return (lambda: attempt(k, v, True)), "flash, enable_gqa" + padded
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attempt(kk, vv, False)
        return (lambda: attempt(kk, vv, False)), "flash, K/V repeated outside the timing" + padded


def fa2_fn(q, k, v):
    """FlashAttention 2's own forward (``flash_attn_func``, layout [B, T, H, D], GQA without repeating K/V).
    Raises ImportError without the flash-attn package. Returns (fn, how)."""
    from flash_attn import __version__, flash_attn_func

    v, v_dim, padded = _v_padded(q, v)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))   # transposed once, outside the timing
    return (lambda: flash_attn_func(qt, kt, vt, causal=True)[..., :v_dim]), \
        f"flash-attn {__version__}, native GQA{padded}"


def flops(name: str, batch: int, heads: int, length: int, dim: int, v_dim: int | None = None) -> float:
    """Useful FLOPs of a method (see the module docstring); v_dim: v's head dim (default dim)."""
    tri = batch * heads * length * length / 2                    # causal entries
    qk, pv = 2 * tri * dim, 2 * tri * (v_dim or dim)
    band_entries = sum(max(0, t - BAND[0] - max(0, t - BAND[1]) + 1) for t in range(length))
    band = 2 * batch * heads * dim * band_entries
    return {"sdpa_flash": qk + pv, "fa2": qk + pv, "stats_with_out": qk + pv, "stats_no_out": qk,
            "influence_full": qk, "influence_band": band}.get(name, qk + band)


def checked_outputs(name: str, result) -> dict:
    """{reference name: [Hq, T]} of a method's result (B = 1), or {} for SDPA."""
    if name in ("stats_with_out", "stats_no_out"):
        return {"lse": result[0][0], "distance": result[1][0], "waad": result[2][0]}
    if name == "influence_band":
        return {"fai:band": result[0]}
    if name == "influence_full":
        return {"fai:full": result[0]}
    if name == "api_metrics_only":
        return {"lse": result.lse[0], "distance": result.distance[0], "waad": result.waad[0],
                "fai:band": result.fai[0]}
    if name == "eager_maps":
        return {"distance": result[0][0], "waad": result[1][0], "fai:band": result[2][0]}
    return {}


class References:
    """The fp64 reference (and the input-dtype one for fp16/bf16) of one shape, computed on first use."""

    def __init__(self, q, k, scale, stream, shape):
        self.q, self.k, self.scale, self.stream, self.shape = q, k, scale, stream, shape
        self.ref64 = self.ref_lp = None

    def get(self):
        import torch

        from reference_check import reference_metrics

        if self.ref64 is None:
            started = time.perf_counter()
            kwargs = dict(scale=self.scale, window=WINDOW, horizons={"band": BAND, "full": FULL})
            self.ref64 = reference_metrics(self.q, self.k, compute_dtype=torch.float64, **kwargs)
            if self.q.dtype != torch.float32:
                self.ref_lp = reference_metrics(self.q, self.k, compute_dtype=self.q.dtype, **kwargs)
            self.stream.emit("reference", **self.shape, seconds=round(time.perf_counter() - started, 2),
                              what="fp64" + ("" if self.ref_lp is None else f" and {self.q.dtype} (the bound)"))
        return self.ref64, self.ref_lp


def bench_shape(args, timer, stream, cuda, q_heads, kv_heads, length, dim, v_dim, dtype, warmup, repeats,
                started):
    import torch

    import rhythm
    from eager_maps import eager_maps
    from reference_check import compare
    from rhythm_kernels import tuned_configs
    from rhythm_kernels.segments import influence_counts, segments_from_mask
    from rhythm_kernels.triton_influence import influence_pass
    from rhythm_kernels.triton_stats import stats_pass

    device = "cuda" if cuda else "cpu"
    shape = {"B": 1, "Hq": q_heads, "Hkv": kv_heads, "T": length, "D": dim, "Dv": v_dim, "dtype": str(dtype)}
    gen = torch.Generator(device=device).manual_seed(length * 1000 + dim)
    make = lambda heads, d: torch.randn(1, heads, length, d, generator=gen, device=device, dtype=dtype)  # noqa: E731
    q, k, v = make(q_heads, dim), make(kv_heads, dim), make(kv_heads, v_dim)
    scale = dim ** -0.5
    segments = segments_from_mask(None, 1, length, None, q.device)
    counts_band = influence_counts(segments, 1, length, BAND)
    counts_full = influence_counts(segments, 1, length, FULL)
    norm = stats_pass(q, k, None, segments, window=WINDOW, scale=scale).norm
    refs = References(q, k, scale, stream, shape)

    methods = {
        "stats_with_out": lambda: stats_pass(q, k, v, segments, window=WINDOW, scale=scale),
        "stats_no_out": lambda: stats_pass(q, k, None, segments, window=WINDOW, scale=scale),
        "influence_band": lambda: (influence_pass(q, k, norm, segments, counts_band, horizon=BAND, scale=scale),),
        "influence_full": lambda: (influence_pass(q, k, norm, segments, counts_full, horizon=FULL, scale=scale),),
        "api_metrics_only": lambda: rhythm.attention_metrics(q, k, backend="triton", window=WINDOW, horizon=BAND,
                                                             validate=False),
    }
    sdpa_out = None
    try:
        sdpa, how = sdpa_flash_fn(q, k, v)
        methods = {"sdpa_flash": sdpa, **methods}
        shape_note = how
    except RuntimeError as exc:
        shape_note = None
        stream.emit("bench", **shape, method="sdpa_flash", result="unavailable", error=str(exc).splitlines()[0][:200])
    notes = {"sdpa_flash": shape_note}
    if cuda:
        try:
            fa2, notes["fa2"] = fa2_fn(q, k, v)
            methods = {"sdpa_flash": methods.pop("sdpa_flash"), "fa2": fa2, **methods} if "sdpa_flash" in methods \
                else {"fa2": fa2, **methods}
        except ImportError as exc:
            stream.emit("bench", **shape, method="fa2", result="unavailable", error=f"flash-attn not importable: {exc}")
    if not args.no_eager:
        methods["eager_maps"] = lambda: eager_maps(q, k, scale=scale, window=WINDOW, horizon=BAND)

    measured = {}
    for name, fn in methods.items():
        if time.perf_counter() - started > args.budget_s:
            stream.emit("skipped", **shape, method=name, reason=f"time budget of {args.budget_s:.0f} s spent")
            continue
        entry = {**shape, "method": name}
        if notes.get(name):
            entry["how"] = notes[name]
        try:
            entry.update(timer.measure(fn, warmup, repeats))
            entry["peak_mem_bytes"], result = timer.peak_and_result(fn)
            entry["tflops"] = flops(name, 1, q_heads, length, dim, v_dim) / (entry["ms"] * 1e-3) / 1e12
            measured[name] = entry["ms"]
            if name == "sdpa_flash":
                sdpa_out = result
            elif name == "fa2":
                pass   # a baseline: timed only
            elif not args.no_check:
                ours = checked_outputs(name, result)
                entry["check"] = compare(ours, *refs.get(), dtype)
                entry["ok"] = all(c["ok"] for c in entry["check"].values())
                if name == "stats_with_out" and sdpa_out is not None:
                    # sanity, not a section 7 check: our O against SDPA's O, both in the input dtype
                    entry["out_vs_sdpa_max_abs"] = float((result[3].float() - sdpa_out.transpose(1, 2).float())
                                                         .abs().max())
            del result
        except Exception as exc:  # noqa: BLE001 - a failing method is recorded, the others still run
            if is_oom(exc):
                entry.update(ms=None, result="oom", error=str(exc).splitlines()[0][:200])
            else:
                entry.update(ms=None, result="error", ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        if cuda:
            torch.cuda.empty_cache()
        try:   # the autotuner's picks so far (none under the interpreter): $OUT/tuned_configs.json
            entry["tuned_configs"] = tuned_configs.write_entries(
                os.path.join(stream.folder, "tuned_configs.json"),
                tuned_configs.entries_from_autotuners(torch.cuda.get_device_name(0) if cuda else "cpu"))
        except Exception as exc:  # noqa: BLE001
            entry["tuned_configs_error"] = f"{type(exc).__name__}: {exc}"
        stream.emit("bench", **entry)

    if "stats_no_out" in measured and "influence_band" in measured:
        measured["metrics_only"] = measured["stats_no_out"] + measured["influence_band"]
    base = measured.get("sdpa_flash")
    if base:
        ratios = {}
        for name, target in TARGETS.items():
            if name in measured:
                applies = cuda and (name != "influence_full" or length >= 8192)   # interpreter: not a timing
                ratios[name] = {"ratio": measured[name] / base, "target": target,
                                "met": (measured[name] / base <= target) if applies else None}
        extra = {}
        if measured.get("fa2"):
            extra["vs_fa2"] = {name: measured[name] / measured["fa2"] for name in TARGETS if name in measured}
        stream.emit("ratios", **shape, metrics_only_ms=measured.get("metrics_only"), vs_sdpa_flash=ratios, **extra)


def parse_shapes(items):
    """["D:T" or "D/Dv:T"] -> [(D, Dv, T)]."""
    shapes = []
    for item in items:
        try:
            dims, length = item.split(":")
            dim, _, v_dim = dims.partition("/")
            shapes.append((int(dim), int(v_dim or dim), int(length)))
        except ValueError:
            sys.exit(f"--shapes: expected D:T or D/Dv:T (e.g. 128:8192, 192/128:2048), got {item!r}")
    return shapes


def benchmark(args, cuda, stream) -> int:
    import torch

    started = time.perf_counter()
    if args.dry_run:
        shapes, (q_heads, kv_heads), warmup = parse_shapes(args.shapes or DRY_SHAPES), args.heads or (4, 2), 0
    else:
        shapes, (q_heads, kv_heads), warmup = parse_shapes(args.shapes or DEFAULT_SHAPES), args.heads or (32, 8), 3
    dtype = torch.bfloat16
    timer = Timer(cuda)
    settings = {"causal": True, "B": 1, "heads": [q_heads, kv_heads], "dtype": str(dtype), "window": WINDOW,
                "horizon_band": BAND, "horizon_full": FULL,
                "response_start": "0 (every position is a response position)", "warmup": warmup,
                "timing": "CUDA events, median of the repeats" if cuda else "perf_counter (interpreter)",
                "check": "docs/definitions.md section 7 against bench/reference_check.py",
                "targets_vs_sdpa_flash": TARGETS,
                "shapes": [f"{d}/{dv}:{t}" if dv != d else f"{d}:{t}" for d, dv, t in shapes]}

    def write_summary() -> str:
        """$OUT/bench_gpu_kernels.json: every benchmark and check record so far (all steps), as one result file."""
        return stream.write_result(SUMMARY, WHAT, settings=settings,
                                   kinds=("bench", "reference", "ratios", "smoke", "skipped"))

    stream.emit("machine", **describe_machine())
    stream.emit("bench_plan", **settings)
    for dim, v_dim, length in shapes:
        if time.perf_counter() - started > args.budget_s:
            stream.emit("skipped", T=length, D=dim, Dv=v_dim, reason=f"time budget of {args.budget_s:.0f} s spent")
            continue
        repeats = 1 if args.dry_run else (10 if length <= 8192 else 5)
        bench_shape(args, timer, stream, cuda, q_heads, kv_heads, length, dim, v_dim, dtype, warmup, repeats,
                    started)
        write_summary()
    print(f"wrote {write_summary()}")
    failed = [r for r in stream.read(("bench",)) if r["step"] == args.step and r.get("ok") is False]
    return 1 if failed else 0


def main(argv=None):
    args = parse_args(argv)
    cuda, stream = gpu_step(args.step, args.dry_run)
    sys.exit(benchmark(args, cuda, stream))


if __name__ == "__main__":
    main()
