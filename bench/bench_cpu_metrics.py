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
WHAT = "attention_metrics torch backend vs eager maps, one SmolLM2-135M layer"


def settings(memory_limit_gib: float, runner: str = "python bench/bench_cpu_metrics.py") -> dict:
    """What every record of this benchmark shares (also the pytest-benchmark suite's, bench/conftest.py)."""
    return {"B": 1, "Hq": HQ, "Hkv": HKV, "D": DIM, "dtype": "float32", "window": WINDOW, "horizon": HORIZON,
            "response_start": "T/4", "memory_limit_gib": memory_limit_gib, "runner": runner,
            "time": "median of the repeats, in a fresh subprocess per measurement",
            "memory": "extra peak RSS over the process's peak after imports, a warm-up call and its inputs"}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def spot_check(metrics, q, k, response_start: int, samples: int = 48, sliding_window: int | None = None) -> dict:
    """Worst error / bound of docs/definitions.md section 7 (<= 1 passes) of the torch backend against fp64
    rows and columns recomputed from q and k: lse, distance and waad on the last rows and on random rows (the
    long-range, cancellation-prone ones), fai on random columns of the response (every attending row of the
    column's horizon recomputed). The full oracle would need T x T fp64 maps. sliding_window: row t sees only
    the keys s with t - s < sliding_window."""
    import torch

    from bench.reference_check import fp32_bound, fp32_scores

    length = q.shape[2]
    gen = torch.Generator().manual_seed(1)
    q64 = q[0].double() * DIM ** -0.5
    k64 = k[0].double().repeat_interleave(HQ // HKV, dim=0)
    k32 = k[0].repeat_interleave(HQ // HKV, dim=0)

    def first_key(t: int) -> int:
        return 0 if sliding_window is None else max(0, t - sliding_window + 1)

    rows = sorted(set(range(length - samples // 2, length)) |
                  set(torch.randint(0, length, (samples // 2,), generator=gen).tolist()))
    h_lo, h_hi = HORIZON
    columns = {s: range(max(s + h_lo, response_start), min(length - 1, s + h_hi) + 1)
               for s in torch.randint(0, length - h_lo, (8,), generator=gen).tolist()}
    # fp32 scores of every row the checks read, 32 rows per product (section 7's conditioning reference)
    needed = sorted(set(rows).union(*columns.values()))
    scores32 = {}
    for i in range(0, len(needed), 32):
        part = needed[i:i + 32]
        block = fp32_scores(q[0][:, part], k32[:, : part[-1] + 1], DIM ** -0.5).double()     # [Hq, rows, keys]
        scores32.update({t: block[:, j, first_key(t): t + 1] for j, t in enumerate(part)})

    def row_attention(t: int, fp32: bool = False) -> torch.Tensor:
        """Scores and probabilities of row t over its visible keys [first_key(t), t]: [Hq, keys] each, in
        fp64; fp32=True: from the scores rounded to fp32."""
        scores = scores32[t] if fp32 else torch.einsum("hd,hsd->hs", q64[:, t], k64[:, first_key(t): t + 1])
        return scores, torch.softmax(scores, dim=-1)

    def row_metrics(t: int, fp32: bool = False) -> dict:
        scores, attn = row_attention(t, fp32)
        lag = (t - torch.arange(first_key(t), t + 1)).double()
        return {"lse": torch.logsumexp(scores, -1), "distance": attn @ lag, "waad": attn @ lag.clamp(max=WINDOW)}

    def column_fai(s: int, attending: range, fp32: bool = False) -> torch.Tensor:
        parts = [row_attention(t, fp32)[1][:, s - first_key(t)] for t in attending if s >= first_key(t)]
        return sum(parts, torch.zeros(HQ, dtype=torch.float64)) / len(attending)     # invisible rows add 0

    # per metric: (ours, fp64 reference, reference from fp32 scores) of every checked row / column
    checked = {name: ([], [], []) for name in ("lse", "distance", "waad", "fai")}
    for t in rows:
        want, want32 = row_metrics(t), row_metrics(t, fp32=True)
        for name, ref in want.items():
            for part, value in zip(checked[name], (getattr(metrics, name)[0, :, t].double(), ref, want32[name])):
                part.append(value)
    for s, attending in columns.items():
        if not attending:
            continue
        for part, value in zip(checked["fai"], (metrics.fai[0, :, s].double(), column_fai(s, attending),
                                                column_fai(s, attending, fp32=True))):
            part.append(value)
    worst = {}
    for name, (ours, ref, ref32) in checked.items():
        ours, ref, ref32 = torch.stack(ours), torch.stack(ref), torch.stack(ref32)
        bound = fp32_bound(name, ref, (ref32 - ref).abs().max().item())
        worst[name] = ((ours - ref).abs() / bound).max().item()
    return {"worst_error_over_spec_bound": worst, "rows_checked": len(rows)}


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
    result = {"seconds": times[len(times) // 2], "all_seconds": times,
              "extra_peak_rss_mib": (_peak_rss_bytes() - base) / 2**20}
    if method == "torch":
        result["accuracy"] = spot_check(run(q, k), q, k, length // 4)
    return result


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
    from bench.records import describe_machine, write_result

    machine = describe_machine()
    records, ratios = [], []
    for length in args.lengths:
        repeats = args.repeats if length <= 4096 else 1
        ours = run_in_subprocess("torch", length, repeats, args.memory_limit_gib)
        eager = run_in_subprocess("eager", length, repeats, args.memory_limit_gib)
        records += [{"kind": "measurement", "method": "torch_backend", "T": length, "repeats": repeats, **ours},
                    {"kind": "measurement", "method": "eager_pipeline", "T": length, "repeats": repeats, **eager}]
        if not ours.get("failed") and not eager.get("failed"):
            ratios.append({"T": length, "time_ratio": ours["seconds"] / eager["seconds"],
                           "memory_ratio": ours["extra_peak_rss_mib"] / max(eager["extra_peak_rss_mib"], 1e-9)})
            print(json.dumps(ratios[-1]))
    write_result(args.out, "cpu_metrics", WHAT, machine=machine, settings=settings(args.memory_limit_gib),
                 records=records, summary={"ratios_same_run": ratios})


if __name__ == "__main__":
    main()
