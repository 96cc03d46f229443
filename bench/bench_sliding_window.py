"""CPU benchmark: the torch backend on a sliding-window layer against the same call with full attention.

One SmolLM2-like layer (Hq 9, Hkv 3, D 64, fp32), T = 16384, W = 10, horizon (10, 100), the response starting
at T/4; the windowed call describes the layer with ``LayerAttention(sliding_window=4096)``, so each row scores
at most 4096 keys (about 0.44 of the causal triangle's keys at this T). Both calls run in one process,
alternating, after a warm-up of each at T = 1024; the time of each is the median of the repeats. The accuracy
of both results (from their last timed call) is checked in the same run against fp64 rows and columns
recomputed from q and k (lse, distance, waad on the last and on random rows, fai on random response columns):
worst error / docs/definitions.md section 7 bound, <= 1 passes. --threads sets torch's intra-op threads
(default: torch's choice); on a shared, busy machine one thread per process keeps the two calls' timings
comparable.

    python bench/bench_sliding_window.py [--length 16384] [--sliding-window 4096] [--repeats 3] [--threads N]
                                         [--out bench/results/sliding_window_cpu.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--sliding-window", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench/results/sliding_window_cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, os.getcwd())
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import rhythm
    from bench.bench_cpu_metrics import DIM, HKV, HORIZON, HQ, WINDOW, spot_check
    from bench.records import describe_machine, write_result

    machine = describe_machine()
    length, response_start = args.length, args.length // 4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HQ, length, DIM, generator=gen) * 1.5
    k = torch.randn(1, HKV, length, DIM, generator=gen) * 1.5
    layers = {"full": None, "sliding_window": rhythm.LayerAttention(sliding_window=args.sliding_window)}

    def run(name, q, k):
        return rhythm.attention_metrics(q, k, window=WINDOW, horizon=HORIZON, response_start=q.shape[2] // 4,
                                        backend="torch", validate=False, layer=layers[name])

    for name in layers:                     # warm-up (code pages, allocator arenas) on a small input
        run(name, q[:, :, :1024], k[:, :, :1024])
    times = {name: [] for name in layers}
    last = {}
    for _ in range(args.repeats):
        for name in layers:
            begin = time.perf_counter()
            last[name] = run(name, q, k)
            times[name].append(time.perf_counter() - begin)
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    accuracy = {"full": spot_check(last["full"], q, k, response_start),
                "sliding_window": spot_check(last["sliding_window"], q, k, response_start,
                                             sliding_window=args.sliding_window)}
    records = [{"kind": "measurement", "layer": name, "seconds": median[name], "all_seconds": times[name],
                "accuracy": accuracy[name]} for name in layers]
    summary = {"speedup_sliding_window_over_full": median["full"] / median["sliding_window"],
               "load_average_at_end": os.getloadavg()}
    print(median, summary)
    write_result(args.out, "sliding_window", "attention_metrics torch backend: sliding-window layer vs the same "
                 "call with full attention", machine=machine,
                 settings={"B": 1, "Hq": HQ, "Hkv": HKV, "D": DIM, "T": length, "dtype": "float32", "window": WINDOW,
                           "horizon": HORIZON, "response_start": response_start,
                           "sliding_window": args.sliding_window, "repeats": args.repeats,
                           "torch_threads": torch.get_num_threads(),
                           "time": "median of the repeats, both calls alternating in one process"},
                 records=records, summary=summary)


if __name__ == "__main__":
    main()
