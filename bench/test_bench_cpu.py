"""The CPU micro-benchmarks as pytest-benchmark tests: ``pytest bench --benchmark-only``.

- ``test_metrics``: ``attention_metrics(backend="torch")`` against the eager-maps pipeline on one SmolLM2-135M
  layer (bench/bench_cpu_metrics.py), T from $RHYTHM_BENCH_LENGTHS (default "1024 2048 4096").
- ``test_credit``: ``credit_multipliers`` per strategy on 512 x 8K tokens against one layer's metrics over one
  8K sequence (bench/bench_credit.py); $RHYTHM_BENCH_CREDIT_SHAPE="B T" changes the shape.

Timing runs in this process (pytest-benchmark's rounds, after a warm-up round); the extra peak RSS comes from
a fresh child process per method (the plain scripts' measurement). Results land in cpu_metrics_pytest.json and
credit_cpu_pytest.json in a temporary folder of the session, named at the end of the run, or in
$RHYTHM_BENCH_OUT (``RHYTHM_BENCH_OUT=bench/results`` to replace the committed files; bench/conftest.py). The
default test run (testpaths = tests) does not collect this folder.
"""
from __future__ import annotations

import os

import pytest

from bench import bench_cpu_metrics, bench_credit

LENGTHS = [int(x) for x in os.environ.get("RHYTHM_BENCH_LENGTHS", "1024 2048 4096").split()]
CREDIT_B, CREDIT_T = (int(x) for x in os.environ.get("RHYTHM_BENCH_CREDIT_SHAPE", "512 8192").split())
MEMORY_LIMIT_GIB = 18.0
HQ, HKV, DIM = bench_cpu_metrics.HQ, bench_cpu_metrics.HKV, bench_cpu_metrics.DIM


def _qk(length: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, HQ, length, DIM, generator=gen) * 1.5,
            torch.randn(1, HKV, length, DIM, generator=gen) * 1.5)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("method", ["torch", "eager"])
def test_metrics(benchmark, method, length):
    import rhythm
    from bench.conftest import record
    from bench.eager_maps import eager_maps

    window, horizon, response_start = bench_cpu_metrics.WINDOW, bench_cpu_metrics.HORIZON, length // 4
    child = bench_cpu_metrics.run_in_subprocess(method, length, 1, MEMORY_LIMIT_GIB)
    if child.get("failed"):
        pytest.skip(f"{method} at T={length} failed in its child process: {child['error']}")
    q, k = _qk(length)

    def run():
        if method == "eager":
            return eager_maps(q, k, scale=DIM ** -0.5, window=window, horizon=horizon, response_start=response_start)
        return rhythm.attention_metrics(q, k, window=window, horizon=horizon, response_start=response_start,
                                        backend="torch")

    benchmark.group = f"metrics T={length}"
    benchmark.extra_info["extra_peak_rss_mib"] = child["extra_peak_rss_mib"]
    out = benchmark.pedantic(run, rounds=3 if length <= 4096 else 1, warmup_rounds=1, iterations=1)
    accuracy = None
    if method == "torch":
        accuracy = bench_cpu_metrics.spot_check(out, q, k, response_start)
        worst = max(accuracy["worst_error_over_spec_bound"].values())
        assert worst <= 1, f"torch backend exceeds the docs/definitions.md section 7 bound: {worst:.3g} x bound"
    record("cpu_metrics", benchmark, method=method, T=length, extra_peak_rss_mib=child["extra_peak_rss_mib"],
           accuracy=accuracy)


@pytest.mark.parametrize("method", list(bench_credit.STRATEGIES) + ["metrics"])
def test_credit(benchmark, method):
    import rhythm
    from bench.conftest import record

    child = bench_credit.run_in_subprocess(method, CREDIT_B, CREDIT_T, 1, _threads())
    if child.get("failed"):
        pytest.skip(f"{method} failed in its child process: {child['error']}")
    if method == "metrics":
        q, k = _qk(CREDIT_T)

        def run():
            return rhythm.attention_metrics(q, k, window=bench_credit.WINDOW, horizon=bench_credit.HORIZON,
                                            response_start=CREDIT_T // 4, backend="torch")
    else:
        waad, fai, response_mask, fai_valid, entropy = bench_credit.credit_inputs(CREDIT_B, CREDIT_T)

        def run():
            return rhythm.credit_multipliers(waad, fai, response_mask, strategy=method, fai_valid=fai_valid,
                                             entropy=entropy)

    benchmark.group = f"credit {CREDIT_B}x{CREDIT_T} vs one layer's metrics"
    benchmark.extra_info["extra_peak_rss_mib"] = child["extra_peak_rss_mib"]
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    record("credit_cpu", benchmark, method=method, B=CREDIT_B if method != "metrics" else 1, T=CREDIT_T,
           extra_peak_rss_mib=child["extra_peak_rss_mib"])


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _metrics_summary(rows: list[dict]) -> tuple[str, dict, dict]:
    """(what, settings, summary): time and memory ratios torch backend / eager maps per T (medians of this run)."""
    by = {(r["method"], r["T"]): r for r in rows}
    ratios = []
    for length in sorted({r["T"] for r in rows}):
        ours, eager = by.get(("torch", length)), by.get(("eager", length))
        if ours and eager:
            ratios.append({"T": length, "time_ratio": ours["seconds"]["median"] / eager["seconds"]["median"],
                           "memory_ratio": ours["extra_peak_rss_mib"] / max(eager["extra_peak_rss_mib"], 1e-9)})
    settings = dict(bench_cpu_metrics.settings(MEMORY_LIMIT_GIB),
                    time="pytest-benchmark rounds in this process, after a warm-up round",
                    memory="extra peak RSS of a fresh child process (the plain script's measurement)")
    return bench_cpu_metrics.WHAT + " (pytest-benchmark)", settings, {"ratios_same_run": ratios}


def _credit_summary(rows: list[dict]) -> tuple[str, dict, dict]:
    """(what, settings, summary): slowest strategy over one layer's metrics (minimum of the rounds: the least
    contended run)."""
    credit = [r for r in rows if r["method"] != "metrics"]
    metrics = [r for r in rows if r["method"] == "metrics"]
    settings = {"credit_shape": bench_credit.credit_shape(CREDIT_B, CREDIT_T),
                "metrics_shape": bench_credit.metrics_shape(CREDIT_T),
                "time": "pytest-benchmark rounds in this process, after a warm-up round"}
    summary = {}
    if credit and metrics:
        slowest = max(credit, key=lambda r: r["seconds"]["min"])
        summary["slowest_strategy"] = slowest["method"]
        summary["slowest_credit_over_metrics"] = slowest["seconds"]["min"] / metrics[0]["seconds"]["min"]
    return bench_credit.WHAT + " (pytest-benchmark)", settings, summary


SUMMARIES = {"cpu_metrics": _metrics_summary, "credit_cpu": _credit_summary}
