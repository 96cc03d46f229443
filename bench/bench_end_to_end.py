"""End-to-end: RhythmScorer against the paper's way (eager attention with output_attentions=True).

CPU (default): SmolLM2-135M-Instruct (the bundled GGUF, float32), batch 4 x 1024 and 1 x 4096 tokens.
The eager side is timed on its forward alone (the maps are not even turned into metrics), so the time
ratio is conservative. Each measurement runs in a fresh subprocess; peak memory is the process's peak
RSS *during the measured forwards, model included* (VmHWM reset through /proc/self/clear_refs after
loading, so the GGUF de-quantisation transient does not count). The eager subprocess runs under an
address-space limit: when its maps do not fit, the result says so instead of swapping the machine.

    python bench/bench_end_to_end.py                      -> bench/results/end_to_end_cpu.json
    python bench/bench_end_to_end.py --gpu [--out DIR]    -> random-init Qwen3-4B shape, bf16, 1 x 8192 on CUDA
    python bench/bench_end_to_end.py --gpu --dry-run      -> the GPU code path on a tiny shape on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CPU_CASES = [(4, 1024), (1, 4096)]


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(batch: int, length: int, vocab: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    response = torch.zeros(batch, length, dtype=torch.bool)
    response[:, length // 4:] = True  # prompt = first quarter
    return ids, response


# ---- CPU worker (runs in the subprocess) -------------------------------------------------------------------------

def cpu_worker(method: str, batch: int, length: int, repeats: int) -> dict:
    import gc

    import torch

    from rhythm.models import load_model
    from rhythm.scoring.scorer import RhythmScorer

    model, _ = load_model(None)
    ids, response = _inputs(batch, length, model.config.vocab_size)
    gc.collect()
    rss_model = _vm_hwm_bytes()
    peak_reset = _reset_peak()
    times = []
    if method == "scorer":
        scorer = RhythmScorer(model, micro_batch_size=batch)
        for _ in range(repeats):
            t = time.perf_counter()
            scorer.score(ids, None, response)
            times.append(time.perf_counter() - t)
    else:
        model.config._attn_implementation = "eager"
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.inference_mode():
                out = model(input_ids=ids, output_attentions=True, use_cache=False)
            times.append(time.perf_counter() - t)
            assert len(out.attentions) == model.config.num_hidden_layers
            del out
            gc.collect()
    return {"method": method, "batch": batch, "length": length, "times_s": times, "time_s": min(times),
            "peak_rss_bytes": _vm_hwm_bytes(), "peak_reset": peak_reset, "rss_after_load_bytes": rss_model}


def run_cpu_case(method, batch, length, repeats, memory_limit_gib) -> dict:
    code = (
        "import resource, json, sys; sys.path.insert(0, %r);"
        "lim = int(%r * 2**30); resource.setrlimit(resource.RLIMIT_AS, (lim, lim));"
        "from bench.bench_end_to_end import cpu_worker;"
        "print('RESULT ' + json.dumps(cpu_worker(%r, %d, %d, %d)))"
    ) % (str(ROOT), memory_limit_gib, method, batch, length, repeats)
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    fits = not any("memory" in x.lower() or "alloc" in x.lower() for x in tail)
    return {"method": method, "batch": batch, "length": length, "error": " | ".join(tail),
            "returncode": proc.returncode, "wall_s": time.time() - t,
            "did_not_fit": (not fits) or proc.returncode in (-9, 137),
            "memory_limit_gib": memory_limit_gib}


def main_cpu(args) -> tuple[dict, list, dict]:
    """(settings, records, summary) of the CPU comparison."""
    settings = {"model": "SmolLM2-135M-Instruct (bundled GGUF Q4_1, dequantised fp32)",
                "scorer": "RhythmScorer.score: sdpa below the sampled layers, fused metrics kernel (torch backend) on "
                          "layers 10,12,15,17,20, forward stopped after layer 20",
                "eager": "model forward with attn_implementation='eager', output_attentions=True (all 30 layers' "
                         "maps, LM head), timed alone: no metric is computed from the maps",
                "time": f"min of {args.repeats} repeats in one fresh subprocess per measurement",
                "memory": "peak RSS (VmHWM) during the measured forwards, model included; reset after load",
                "memory_limit_gib": args.memory_limit_gib}
    records, cases = [], []
    for batch, length in CPU_CASES:
        ours = run_cpu_case("scorer", batch, length, args.repeats, args.memory_limit_gib)
        eager = run_cpu_case("eager", batch, length, args.repeats, args.memory_limit_gib)
        records += [{"kind": "measurement", **ours}, {"kind": "measurement", **eager}]   # each names method, batch, length
        case = {"batch": batch, "length": length}
        if "error" not in ours and "error" not in eager:
            case["time_ratio_scorer_over_eager"] = ours["time_s"] / eager["time_s"]
            case["memory_ratio_scorer_over_eager"] = ours["peak_rss_bytes"] / eager["peak_rss_bytes"]
            case["speedup"] = eager["time_s"] / ours["time_s"]
        elif "error" in eager:
            case["eager_fits"] = False
        print(json.dumps(case), "scorer", ours.get("time_s"), ours.get("peak_rss_bytes"), "eager",
              eager.get("time_s"), eager.get("peak_rss_bytes"), eager.get("error", ""), flush=True)
        cases.append(case)
    targets = {}
    for case in cases:
        if (case["batch"], case["length"]) == (4, 1024) and "time_ratio_scorer_over_eager" in case:
            targets["4x1024_time<=0.3"] = case["time_ratio_scorer_over_eager"] <= 0.3
            targets["4x1024_memory<=0.25"] = case["memory_ratio_scorer_over_eager"] <= 0.25
        if (case["batch"], case["length"]) == (1, 4096):
            if "speedup" in case:
                targets["1x4096_speedup>=8"] = case["speedup"] >= 8
            else:
                targets["1x4096_eager_does_not_fit"] = True
    return settings, records, {"cases": cases, "targets_met": targets}


# ---- GPU (one process; CUDA memory counters) -----------------------------------------------------------------------

def main_gpu(args, save) -> tuple[dict, list, dict]:
    """Scorer, SDPA forward, eager forward: ``save(settings, records, summary)`` after each, so a time box loses
    nothing measured. Returns the three."""
    import torch
    import transformers

    from rhythm.scoring.scorer import RhythmScorer

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (use --gpu --dry-run for the code path on CPU)")
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=512)
        batch, length = 1, 256
    else:  # Qwen3-4B
        shape = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936)
        batch, length = 1, args.length
    config = transformers.Qwen3Config(**shape, max_position_embeddings=max(32768, length), tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(config).to(dtype).eval()
    ids, response = _inputs(batch, length, config.vocab_size)
    ids_d = ids.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn, repeats):
        fn()  # warm-up (autotune, allocator)
        sync()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        return {"time_s": min(times), "times_s": times, "peak_bytes": peak}

    scorer = RhythmScorer(model, micro_batch_size=1)
    settings = {"dry_run": args.dry_run, "model": "random-init Qwen3 config", "shape": shape, "batch": batch,
                "length": length, "dtype": str(dtype), "layers": scorer.layers, "repeats": args.repeats,
                "time": "min of the repeats after a warm-up call", "memory": "torch.cuda.max_memory_allocated"}
    records, summary = [], {}
    save(settings, records, summary)
    records.append({"kind": "measurement", "method": "scorer",
                    **timed(lambda: scorer.score(ids, None, response), args.repeats)})
    save(settings, records, summary)

    def sdpa_forward():
        with torch.inference_mode():
            model(input_ids=ids_d, use_cache=False, logits_to_keep=1)
    records.append({"kind": "measurement", "method": "sdpa_full_forward", **timed(sdpa_forward, args.repeats)})
    summary["scorer_over_sdpa_forward"] = records[0]["time_s"] / records[1]["time_s"]
    save(settings, records, summary)

    def eager_forward():
        with torch.inference_mode():
            out = model(input_ids=ids_d, use_cache=False, output_attentions=True, logits_to_keep=1)
            del out
    model.config._attn_implementation = "eager"
    try:
        records.append({"kind": "measurement", "method": "eager_output_attentions", **timed(eager_forward, 1)})
        summary["speedup_vs_eager"] = records[2]["time_s"] / records[0]["time_s"]
    except torch.OutOfMemoryError as e:
        maps = shape["num_hidden_layers"] * shape["num_attention_heads"] * length * length * 2 * batch
        records.append({"kind": "measurement", "method": "eager_output_attentions", "did_not_fit": True,
                        "error": str(e).splitlines()[0], "all_layer_maps_bytes": maps})
    finally:
        model.config._attn_implementation = "sdpa"
        if device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({"records": records, "summary": summary}, indent=1, default=str))
    return settings, records, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="Qwen3-4B-shaped random model on CUDA at 8K tokens")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: tiny shape on CPU (checks the code path)")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-limit-gib", type=float, default=18.0,
                        help="address-space limit of each CPU subprocess")
    parser.add_argument("--out", default=None, help="output folder (default bench/results)")
    args = parser.parse_args()
    from records import write_result          # siblings: bench/ is sys.path[0] for this script

    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results"
    if args.gpu:
        name = "end_to_end_gpu_dryrun" if args.dry_run else "end_to_end_gpu"
        what = "RhythmScorer vs the SDPA forward and the eager output_attentions forward (GPU, Qwen3-4B shape)"

        def save(settings, records, summary, quiet=True):
            write_result(str(out_dir / f"{name}.json"), name, what, settings=settings, records=records,
                         summary=summary, quiet=quiet)
        save(*main_gpu(args, save), quiet=False)
    else:
        settings, records, summary = main_cpu(args)
        write_result(str(out_dir / "end_to_end_cpu.json"), "end_to_end_cpu",
                     "RhythmScorer vs the eager output_attentions forward (CPU, SmolLM2-135M)", settings=settings,
                     records=records, summary=summary)


if __name__ == "__main__":
    main()
