"""CPU benchmark: ``attention_metrics(backend="torch")`` against the eager-maps pipeline users write today.

One SmolLM2-135M layer (Hq 9, Hkv 3, D 64, fp32), T = 1K .. 16K, horizon (10, 100), W = 10, the response
starting at T/4. Each measurement runs in a fresh subprocess: time (median of the repeats) and the increase
of peak RSS over the process's peak after its imports, a warm-up call at T = 128 (code pages, allocator
arenas) and its inputs: the "extra peak" is the working memory of the method itself.
The eager subprocess runs under an address-space limit, so at long T it fails with a clean allocation error
instead of pushing the machine into the OOM killer.

    python bench/bench_cpu_metrics.py [--lengths 1024 2048 4096 8192 16384] [--out bench/results/cpu_metrics.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HQ, HKV, DIM, WINDOW, HORIZON = 9, 3, 64, 10, (10, 100)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(method: str, length: int, repeats: int) -> dict:
    """Runs inside the subprocess: build inputs, run the method, report time and extra peak RSS."""
    import torch

    import rhythm
    from bench.eager_maps import eager_maps

    def run(q, k):
        response_start = q.shape[2] // 4
        if method == "eager":
            return eager_maps(q, k, scale=DIM ** -0.5, window=WINDOW, horizon=HORIZON,
                              response_start=response_start)
        return rhythm.attention_metrics(q, k, window=WINDOW, horizon=HORIZON, response_start=response_start,
                                        backend="torch")

    gen = torch.Generator().manual_seed(0)
    # Warm-up on a tiny input: pages in the kernels' code and the allocator's arenas, a one-time cost that
    # both methods share and that is not the working memory being compared.
    run(torch.randn(1, HQ, 128, DIM, generator=gen), torch.randn(1, HKV, 128, DIM, generator=gen))
    q = torch.randn(1, HQ, length, DIM, generator=gen) * 1.5
    k = torch.randn(1, HKV, length, DIM, generator=gen) * 1.5
    base = _peak_rss_bytes()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        out = run(q, k)
        times.append(time.perf_counter() - begin)
        del out
    times.sort()
    return {"seconds": times[len(times) // 2], "all_seconds": times,
            "extra_peak_rss_mib": (_peak_rss_bytes() - base) / 2**20}


def run_in_subprocess(method: str, length: int, repeats: int, memory_limit_gib: float) -> dict:
    code = (
        "import json, resource, sys; sys.path.insert(0, %r);"
        "lim = int(%r * 2**30); resource.setrlimit(resource.RLIMIT_AS, (lim, lim));"
        "from bench.bench_cpu_metrics import worker;"
        "print('RESULT' + json.dumps(worker(%r, %d, %d)))"
    ) % (os.getcwd(), memory_limit_gib, method, length, repeats)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
    return {"failed": True, "error": tail[0][:300], "memory_limit_gib": memory_limit_gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-limit-gib", type=float, default=18.0,
                        help="address-space limit of each subprocess (the machine has 24 GiB)")
    parser.add_argument("--out", default="bench/results/cpu_metrics.json")
    args = parser.parse_args()
    sys.path.insert(0, os.getcwd())
    from bench.machine import describe, save_json

    rows = []
    for length in args.lengths:
        repeats = args.repeats if length <= 4096 else 1
        ours = run_in_subprocess("torch", length, repeats, args.memory_limit_gib)
        eager = run_in_subprocess("eager", length, repeats, args.memory_limit_gib)
        row = {"T": length, "torch_backend": ours, "eager_pipeline": eager}
        if not ours.get("failed") and not eager.get("failed"):
            row["time_ratio"] = ours["seconds"] / eager["seconds"]
            row["memory_ratio"] = ours["extra_peak_rss_mib"] / max(eager["extra_peak_rss_mib"], 1e-9)
        rows.append(row)
        print(json.dumps(row))
    result = {"benchmark": "attention_metrics torch backend vs eager maps, one SmolLM2-135M layer",
              "shape": {"B": 1, "Hq": HQ, "Hkv": HKV, "D": DIM, "dtype": "float32", "window": WINDOW,
                        "horizon": HORIZON, "response_start": "T/4"},
              "machine": describe(), "rows": rows}
    save_json(args.out, result)


if __name__ == "__main__":
    main()
