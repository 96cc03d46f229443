"""GPU benchmark of the Triton kernels against torch SDPA (flash) and the eager-maps pipeline.

bf16, causal, one layer B x Hq x Hkv x D = 1 x 32 x 8 x {128, 64}, T = 2K, 8K, 32K, every position a response
position (the most influence work). Per (D, T) it times (CUDA events, warmup, median of the repeats):

    sdpa_flash          F.scaled_dot_product_attention(is_causal=True) under SDPBackend.FLASH_ATTENTION
    stats_with_out      our stats pass with v: lse, distance, waad and the attention output O
    stats_no_out        our stats pass without v (the PV product compiled out)
    influence_band      our influence pass, horizon (10, 100)
    influence_full      our influence pass, horizon (10, None)
    metrics_only        stats_no_out + influence_band (sum of the two medians: what the metrics cost)
    api_metrics_only    rhythm.attention_metrics(backend="triton", validate=False): the same plus host work
    eager_maps          softmax(QK^T) materialised in fp32, then distance/waad/fai read off it ("oom" if so)

FLOPs (FlashAttention's convention: only the useful entries of the causal triangle, 2 FLOPs per MAC):
    sdpa_flash, stats_with_out   4 * B * Hq * T^2 * D / 2        (QK^T and PV)
    stats_no_out, influence_full 2 * B * Hq * T^2 * D / 2        (QK^T only; the influence pass recomputes it)
    influence_band               2 * B * Hq * D * (band entries)  (entries with 10 <= t - s <= 100)
    metrics_only, api, eager     stats_no_out + influence_band    (the same useful work, to compare)
Peak memory: torch.cuda.max_memory_allocated() minus the allocation before the call (outputs included).

    python3 bench/bench_gpu_kernels.py                    # on a CUDA machine (about 2 minutes on an H100)
    python3 bench/bench_gpu_kernels.py --dry-run          # CPU, Triton interpreter, tiny shapes: checks the script
    python3 bench/bench_gpu_kernels.py --compile-only     # no GPU needed: compile every kernel variant for sm_90
                                                          # and report shared memory, registers and spills (ptxas -v)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.eager_maps import eager_maps  # noqa: E402  (the shared baseline)

WINDOW = 10
BAND = (10, 100)
FULL = (10, None)
TARGETS = {"stats_with_out": 1.05, "metrics_only": 0.75, "influence_full": 0.6}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1 with tiny shapes")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--heads", type=int, nargs=2, default=None, metavar=("HQ", "HKV"))
    parser.add_argument("--budget-s", type=float, default=210.0,
                        help="stop starting new shapes after this many seconds (the rest is marked skipped)")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the kernels for --arch without a GPU (needs no TRITON_INTERPRET)")
    parser.add_argument("--quick", action="store_true", help="with --compile-only: four representative variants")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only")
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT and bench/results/)")
    return parser.parse_args()


# --------------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def measure(self, fn, warmup: int, repeats: int) -> dict:
        import torch

        start = time.perf_counter()
        fn()                                                     # first call: compile and autotune
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

    def peak_bytes(self, fn) -> int | None:
        import torch

        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return int(peak)


# --------------------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------------------
def sdpa_flash_fn(q, k, v, cuda: bool):
    """SDPA forward under the flash backend (CPU: its flash kernel too). GQA via enable_gqa when the backend
    takes it, else K/V repeated once outside the timed call. Returns (fn, how)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attempt(kk, vv, gqa):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

    try:
        attempt(k, v, True)
        return (lambda: attempt(k, v, True)), "flash, enable_gqa"
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attempt(kk, vv, False)
        return (lambda: attempt(kk, vv, False)), "flash, K/V repeated outside the timing"


def flops(name: str, batch: int, heads: int, length: int, dim: int) -> float:
    tri = batch * heads * length * length * dim / 2
    band_entries = sum(max(0, t - BAND[0] - max(0, t - BAND[1]) + 1) for t in range(length))
    band = 2 * batch * heads * dim * band_entries
    return {"sdpa_flash": 4 * tri, "stats_with_out": 4 * tri, "stats_no_out": 2 * tri,
            "influence_full": 2 * tri, "influence_band": band}.get(name, 2 * tri + band)


def device_info(cuda: bool) -> dict:
    import torch
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), sm_count=props.multi_processor_count)
    else:
        info["device"] = "cpu (Triton interpreter)"
    return info


def chosen_configs() -> dict:
    """The autotuner's pick for the last call of each kernel (None without autotuning)."""
    from rhythm_kernels import triton_influence, triton_stats

    picks = {}
    for name, kernel in (("stats", triton_stats._stats_kernel_tuned),
                         ("influence", triton_influence._influence_kernel_tuned)):
        best = getattr(kernel, "best_config", None)
        picks[name] = None if best is None else str(best)
    return picks


def bench_shape(timer, cuda, batch, q_heads, kv_heads, length, dim, dtype, run_eager, warmup, repeats) -> dict:
    import torch

    import rhythm
    from rhythm_kernels.segments import influence_counts, segments_from_mask
    from rhythm_kernels.triton_influence import influence_pass
    from rhythm_kernels.triton_stats import stats_pass

    device = "cuda" if cuda else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda heads: torch.randn(batch, heads, length, dim, generator=gen, device=device, dtype=dtype)  # noqa: E731
    q, k, v = make(q_heads), make(kv_heads), make(kv_heads)
    scale = dim ** -0.5
    segments = segments_from_mask(None, batch, length, None, q.device)
    counts_band = influence_counts(segments, batch, length, BAND)
    counts_full = influence_counts(segments, batch, length, FULL)
    lse = stats_pass(q, k, None, segments, window=WINDOW, scale=scale)[0]

    methods = {
        "stats_with_out": lambda: stats_pass(q, k, v, segments, window=WINDOW, scale=scale),
        "stats_no_out": lambda: stats_pass(q, k, None, segments, window=WINDOW, scale=scale),
        "influence_band": lambda: influence_pass(q, k, lse, segments, counts_band, horizon=BAND, scale=scale),
        "influence_full": lambda: influence_pass(q, k, lse, segments, counts_full, horizon=FULL, scale=scale),
        "api_metrics_only": lambda: rhythm.attention_metrics(q, k, backend="triton", window=WINDOW, horizon=BAND,
                                                             validate=False),
    }
    row = {"B": batch, "Hq": q_heads, "Hkv": kv_heads, "T": length, "D": dim, "dtype": str(dtype), "methods": {}}
    try:
        sdpa, how = sdpa_flash_fn(q, k, v, cuda)
        methods = {"sdpa_flash": sdpa, **methods}
        row["sdpa"] = how
    except RuntimeError as exc:
        row["methods"]["sdpa_flash"] = {"error": str(exc).splitlines()[0][:200]}
    if run_eager:
        methods["eager_maps"] = lambda: eager_maps(q, k, scale=scale, window=WINDOW, horizon=BAND)

    for name, fn in methods.items():
        try:
            entry = timer.measure(fn, warmup, repeats)
            entry["peak_mem_bytes"] = timer.peak_bytes(fn)
        except torch.cuda.OutOfMemoryError:
            entry = {"ms": None, "result": "oom"}
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                raise
            entry = {"ms": None, "result": "oom"}
        if cuda:
            torch.cuda.empty_cache()
        if entry.get("ms"):
            entry["tflops"] = flops(name, batch, q_heads, length, dim) / (entry["ms"] * 1e-3) / 1e12
        row["methods"][name] = entry

    m = row["methods"]
    if m.get("stats_no_out", {}).get("ms") and m.get("influence_band", {}).get("ms"):
        total = m["stats_no_out"]["ms"] + m["influence_band"]["ms"]
        m["metrics_only"] = {"ms": total, "tflops": flops("metrics_only", batch, q_heads, length, dim) / total / 1e9,
                             "note": "stats_no_out + influence_band (sum of medians)"}
    base = m.get("sdpa_flash", {}).get("ms")
    if base:
        row["vs_sdpa_flash"] = {}
        for name, target in TARGETS.items():
            ms = m.get(name, {}).get("ms")
            if ms:
                applies = cuda and (name != "influence_full" or length >= 8192)   # interpreter: not a timing
                row["vs_sdpa_flash"][name] = {"ratio": ms / base, "target": target,
                                             "met": (ms / base <= target) if applies else None}
        # sanity: our O against SDPA's
        ours = stats_pass(q, k, v, segments, window=WINDOW, scale=scale)[3]
        ref = methods["sdpa_flash"]().transpose(1, 2)
        row["out_vs_sdpa_max_abs"] = float((ours.float() - ref.float()).abs().max())
    row["autotuned_configs"] = chosen_configs()
    return row


# --------------------------------------------------------------------------------------------------------
# Compile-only: the GPU code path (native fp16/bf16 dots, no interpreter upcast) checked without a GPU
# --------------------------------------------------------------------------------------------------------
_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    """Triton signature of ``fn``: pointers as given, batch strides int64 (the long-context path), other ints
    int32, the scale fp32."""
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name == "scale2":
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name.startswith("stride_") and name.endswith("b") else "i32"
    missing = set(constexprs) - {p.name for p in fn.params if p.is_constexpr}
    assert not missing, f"unknown constexprs {missing}"
    return sig


def compile_variant(kind: str, dtype, dim: int, flag: bool, meta: dict, arch: int) -> dict:
    """Compile one kernel variant for ``arch``; report shared memory, registers, spills and the MMA used."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rhythm_kernels import triton_influence, triton_stats

    d_pad = max(16, triton.next_power_of_2(dim))
    t = "*" + _DTYPE_NAMES[str(dtype).replace("torch.", "")]
    meta = dict(meta)
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    prec = "ieee" if t == "*fp32" else "tf32"
    if kind == "stats":
        fn = triton_stats._stats_kernel
        const = dict(HEAD_DIM=dim, D_PAD=d_pad, HAS_V=flag, UPCAST=False, DOT_PREC=prec, SMALL_M=meta["BLOCK_M"],
                     **meta)
        pointers = {"Q": t, "K": t, "V": t, "Out": t if flag else "*fp32", "Lse": "*fp32", "Dist": "*fp32",
                    "Waad": "*fp32", "Table": "*i32"}
    else:
        fn = triton_influence._influence_kernel
        const = dict(HEAD_DIM=dim, D_PAD=d_pad, HAS_HI=flag, UPCAST=False, DOT_PREC=prec, SMALL_N=meta["BLOCK_N"],
                     **meta)
        pointers = {"Q": t, "K": t, "Lse": "*fp32", "Counts": "*i64", "Fai": "*fp32", "Table": "*i32"}
    label = f"{kind} {t[1:]} D={dim} {'HAS_V' if kind == 'stats' else 'HAS_HI'}={flag} {meta} w{warps} s{stages}"
    started = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, _signature(fn, pointers, const), const),
                                target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:  # noqa: BLE001 - report every compile failure
        return {"variant": label, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    ptx = kernel.asm["ptx"]
    report = {"variant": label, "ok": True, "shared_bytes": kernel.metadata.shared,
              "mma": "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma"),
              "compile_s": round(time.perf_counter() - started, 2)}
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
            handle.write(ptx)
        suffix = "a" if arch >= 90 else ""
        info = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", handle.name, "-o", os.devnull],
                              capture_output=True, text=True, timeout=120).stderr
        os.unlink(handle.name)
        regs = re.findall(r"Used (\d+) registers", info)
        spills = re.findall(r"(\d+) bytes spill stores", info)
        report.update(registers=int(regs[0]) if regs else None, spill_store_bytes=int(spills[0]) if spills else None)
    except Exception as exc:  # noqa: BLE001 - ptxas -v is informative only
        report["ptxas"] = f"unavailable: {exc}"
    return report


def compile_only(args) -> None:
    import torch

    from rhythm_kernels import triton_influence, triton_stats

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    variants = []
    if args.quick:
        variants += [("stats", bf16, 128, True, triton_stats.default_stats_config(128, bf16)),
                     ("influence", bf16, 128, False, triton_influence.default_influence_config(128, bf16)),
                     ("stats", fp32, 64, True, triton_stats.default_stats_config(64, fp32)),
                     ("influence", fp32, 48, True, triton_influence.default_influence_config(64, fp32))]
    else:
        def meta(config):
            return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}

        for config in triton_stats.STATS_CONFIGS:
            for dim in (128, 64):
                for has_v in (True, False):
                    variants.append(("stats", bf16, dim, has_v, meta(config)))
        for config in triton_influence.INFLUENCE_CONFIGS:
            for dim in (128, 64):
                for has_hi in (True, False):
                    variants.append(("influence", bf16, dim, has_hi, meta(config)))
        for dtype, dim in ((fp32, 64), (fp32, 128), (fp32, 48), (fp32, 256), (fp16, 256), (bf16, 256), (bf16, 80),
                           (fp16, 128)):
            d_pad = max(16, 1 << (dim - 1).bit_length())
            variants.append(("stats", dtype, dim, True, triton_stats.default_stats_config(d_pad, dtype)))
            variants.append(("influence", dtype, dim, False, triton_influence.default_influence_config(d_pad, dtype)))
    reports = []
    for variant in variants:
        reports.append(compile_variant(*variant, arch=args.arch))
        print(json.dumps(reports[-1]), flush=True)
    failed = [r for r in reports if not r["ok"]]
    path = args.out or os.path.join(os.environ.get("OUT") or os.environ.get("TMPDIR", "/tmp"), "compile_check.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"arch": args.arch, "variants": reports}, handle, indent=2)
    print(f"{len(reports) - len(failed)}/{len(reports)} variants compiled for sm_{args.arch}; wrote {path}")
    if failed:
        sys.exit(1)


def main():
    args = parse_args()
    if args.compile_only:
        if os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("--compile-only needs the compiler: unset TRITON_INTERPRET")
        sys.path.insert(0, os.getcwd())
        compile_only(args)
        return
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.getcwd())
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no CUDA device: run with --dry-run (Triton interpreter, tiny shapes)")
    if args.dry_run:
        lengths, dims, (q_heads, kv_heads) = args.lengths or [64, 96], args.dims or [64], args.heads or (4, 2)
        warmup, dtype = 0, torch.bfloat16
    else:
        lengths, dims = args.lengths or [2048, 8192, 32768], args.dims or [128, 64]
        (q_heads, kv_heads), warmup, dtype = args.heads or (32, 8), 3, torch.bfloat16
    timer = Timer(cuda)
    started = time.perf_counter()
    paths = output_paths(args, cuda)
    rows = []
    for dim in dims:
        for length in lengths:
            if time.perf_counter() - started > args.budget_s:
                rows.append({"T": length, "D": dim, "skipped": f"time budget of {args.budget_s:.0f} s spent"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            repeats = 1 if args.dry_run else (10 if length <= 8192 else 5)
            row = bench_shape(timer, cuda, 1, q_heads, kv_heads, length, dim, dtype, not args.no_eager,
                              warmup, repeats)
            rows.append(row)
            summary = {name: entry.get("ms", entry.get("result")) for name, entry in row["methods"].items()}
            print(json.dumps({"T": length, "D": dim, "ms": summary, "vs_sdpa": row.get("vs_sdpa_flash")}),
                  flush=True)
            save(paths, cuda, warmup, started, rows)        # after every shape: a time-boxed run keeps its rows
    save(paths, cuda, warmup, started, rows, final=True)


def output_paths(args, cuda: bool) -> list[str]:
    if args.out:
        return [args.out]
    paths = []
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "bench_gpu_kernels.json"))
    if cuda:
        import torch

        slug = torch.cuda.get_device_name(0).replace(" ", "_").replace("/", "_")
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        paths.append(os.path.join("bench", "results", f"gpu_kernels_{slug}_{stamp}.json"))
    else:
        paths.append(os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench_gpu_kernels_dryrun.json"))
    return paths


def save(paths, cuda, warmup, started, rows, final=False) -> None:
    result = {
        "benchmark": "rhythm triton kernels vs SDPA flash forward and the eager-maps pipeline",
        "complete": final,
        "machine": device_info(cuda),
        "settings": {"causal": True, "window": WINDOW, "horizon_band": BAND, "horizon_full": FULL,
                     "response_start": "0 (every position is a response position)", "warmup": warmup,
                     "timing": "CUDA events, median of the repeats" if cuda else "perf_counter (interpreter)"},
        "flops_convention": {
            "sdpa_flash, stats_with_out": "4*B*Hq*T^2*D/2 (QK^T + PV over the causal half)",
            "stats_no_out, influence_full": "2*B*Hq*T^2*D/2 (QK^T over the causal half)",
            "influence_band": "2*B*Hq*D*(entries with 10 <= t-s <= 100)",
            "metrics_only, api_metrics_only, eager_maps": "stats_no_out + influence_band (same useful work)",
        },
        "targets_vs_sdpa_flash": TARGETS,
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    for path in paths:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as handle:
            json.dump(result, handle, indent=2)
        if final:
            print(f"wrote {path}")

if __name__ == "__main__":
    main()
