"""CPU micro-benchmark: ``credit_multipliers`` (all five strategies) for a batch of 512 responses of 8K
tokens, against ``attention_metrics(backend="torch")`` of one SmolLM2-135M layer (Hq 9, Hkv 3, D 64, fp32)
over one 8K sequence, on the same machine.

The credit inputs are random per-token signals (WAAD in [0, 10], FAI in [0, 1], entropy, fai_valid False
on the last 10 response tokens) with mixed layouts: left padding, a prompt, the response, right padding.
Each measurement runs in a fresh subprocess: time = minimum (and median) of the repeats, memory = increase of peak RSS
over the process's peak after its imports and inputs ("extra peak").

    python bench/bench_credit.py [--batch 512] [--length 8192] [--repeats 5] [--threads N] [--out bench/results/credit_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STRATEGIES = ("local", "global", "coupled", "random", "entropy")
HQ, HKV, DIM, WINDOW, HORIZON = 9, 3, 64, 10, (10, 100)
WHAT = "credit_multipliers (5 strategies) vs attention_metrics torch backend of one layer"


def credit_shape(batch: int, length: int) -> dict:
    return {"B": batch, "T": length, "q": 0.4, "gamma_amp": 1.5, "alpha": 0.5, "k": 3}


def metrics_shape(length: int) -> dict:
    return {"B": 1, "Hq": HQ, "Hkv": HKV, "D": DIM, "T": length, "dtype": "float32", "window": WINDOW,
            "horizon": HORIZON, "response_start": "T/4", "backend": "torch",
            "passes": "stats + influence (the whole attention_metrics call)"}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def credit_inputs(batch: int, length: int):
    """Random signals and a mixed-layout response mask [batch, length] (vectorised, seeded)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    pos = torch.arange(length)[None, :]
    left_pad = torch.randint(0, length // 8, (batch, 1), generator=gen)
    prompt = torch.randint(16, length // 8, (batch, 1), generator=gen)
    right_pad = torch.randint(0, length // 4, (batch, 1), generator=gen)
    resp_start, resp_end = left_pad + prompt, length - right_pad
    response_mask = (pos >= resp_start) & (pos < resp_end)
    fai_valid = response_mask & (pos < resp_end - HORIZON[0])
    waad = torch.rand(batch, length, generator=gen) * WINDOW
    fai = torch.rand(batch, length, generator=gen)
    entropy = torch.rand(batch, length, generator=gen) * 3
    return waad, fai, response_mask, fai_valid, entropy


def worker(method: str, batch: int, length: int, repeats: int) -> dict:
    """Runs inside the subprocess: build inputs, run the method, report time and extra peak RSS."""
    import torch

    import rhythm

    if method == "metrics":
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, HQ, length, DIM, generator=gen) * 1.5
        k = torch.randn(1, HKV, length, DIM, generator=gen) * 1.5

        def call():
            return rhythm.attention_metrics(q, k, window=WINDOW, horizon=HORIZON, response_start=length // 4,
                                            backend="torch")
    else:
        waad, fai, response_mask, fai_valid, entropy = credit_inputs(batch, length)

        def call():
            return rhythm.credit_multipliers(waad, fai, response_mask, strategy=method, fai_valid=fai_valid,
                                             entropy=entropy)
    base = _peak_rss_bytes()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - begin)
        del out
    # The machine is shared: the minimum is the least contended run, the median is reported beside it.
    return {"seconds": min(times), "median_seconds": sorted(times)[len(times) // 2], "all_seconds": times,
            "extra_peak_rss_mib": (_peak_rss_bytes() - base) / 2**20}


def run_in_subprocess(method: str, batch: int, length: int, repeats: int, threads: int) -> dict:
    code = ("import json, sys, torch; sys.path.insert(0, %r); torch.set_num_threads(%d);"
            "from bench.bench_credit import worker;"
            "print('RESULT' + json.dumps(worker(%r, %d, %d, %d)))") % (os.getcwd(), threads, method, batch, length,
                                                                      repeats)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
    return {"failed": True, "error": tail[0][:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--out", default="bench/results/credit_cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, os.getcwd())
    from bench.records import describe_machine, write_result

    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    machine = describe_machine()
    records = []
    for strategy in STRATEGIES:
        records.append({"kind": "measurement", "method": "credit_multipliers", "strategy": strategy,
                        **run_in_subprocess(strategy, args.batch, args.length, args.repeats, threads)})
        print(json.dumps(records[-1]), flush=True)
    metrics = run_in_subprocess("metrics", 1, args.length, args.repeats, threads)
    records.append({"kind": "measurement", "method": "attention_metrics_one_layer", **metrics})
    print(json.dumps(records[-1]), flush=True)
    ok = [r["seconds"] for r in records[:-1] if not r.get("failed")]
    summary = {"load_average_at_end": os.getloadavg()}
    if ok and not metrics.get("failed"):
        summary["slowest_credit_over_metrics"] = max(ok) / metrics["seconds"]
        summary["credit_cheaper_than_metrics"] = max(ok) < metrics["seconds"]
    write_result(args.out, "credit", WHAT, machine=machine, records=records, summary=summary,
                 settings={"credit_shape": credit_shape(args.batch, args.length),
                           "metrics_shape": metrics_shape(args.length), "repeats": args.repeats,
                           "torch_threads": threads, "runner": "python bench/bench_credit.py",
                           "note": "the CPU is shared with other jobs: seconds is the minimum of the repeats "
                                   "(least contended), median_seconds beside it"})


if __name__ == "__main__":
    main()
