"""A small end-to-end run of the metrics on random q/k: ``python -m rhythm.quickstart``.

Compares the blocked torch backend with the materialised oracle at one SmolLM2-135M-shaped layer and
prints a summary (per-head mean WAAD / distance / FAI, worst error, time)."""
from __future__ import annotations

import argparse
import time

import torch

from rhythm.metrics.attention import attention_metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=1024, help="sequence length T")
    parser.add_argument("--response-start", type=int, default=256, help="first response position")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, args.length, 64, generator=gen) * 1.5       # SmolLM2-135M: Hq 9, Hkv 3, D 64
    k = torch.randn(1, 3, args.length, 64, generator=gen) * 1.5
    timings = {}
    results = {}
    for backend in ("torch", "reference"):
        begin = time.perf_counter()
        results[backend] = attention_metrics(q, k, response_start=args.response_start, backend=backend)
        timings[backend] = time.perf_counter() - begin
    ours, ref = results["torch"], results["reference"]
    print(f"T = {args.length}, response from {args.response_start}, Hq 9 / Hkv 3 / D 64, fp32")
    print(f"{'head':>4} {'mean distance':>14} {'mean WAAD':>10} {'mean FAI (valid)':>17}")
    for head in range(9):
        valid = ours.fai_valid[0, head]
        print(f"{head:>4} {ours.distance[0, head].mean():14.2f} {ours.waad[0, head].mean():10.3f} "
              f"{ours.fai[0, head][valid].mean():17.5f}")
    worst = {name: (getattr(ours, name) - getattr(ref, name)).abs().max().item()
             for name in ("lse", "distance", "waad", "fai")}
    print("worst |torch - oracle|: " + ", ".join(f"{n} {e:.2e}" for n, e in worst.items()))
    print(f"time: torch backend {timings['torch'] * 1e3:.1f} ms, materialised oracle (fp64) "
          f"{timings['reference'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
