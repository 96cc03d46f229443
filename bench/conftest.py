"""pytest-benchmark set-up of the CPU micro-benchmarks (``pytest bench --benchmark-only``).

Each benchmark test records its timing statistics (pytest-benchmark, in this process) and, from a fresh child
process, the extra peak RSS of the method (the same measurement as the plain scripts). At the end of the
session the results of the run are written as JSON (``<suite>_pytest.json``, ``rhythm-bench/1``) with the
machine named, together with the same-run ratios against the baseline: torch backend over eager maps per T,
and the slowest credit strategy over one layer's metrics. They go to a fresh temporary folder of the session
(pytest's ``tmp_path_factory``), so running the tests never changes the files committed under bench/results/;
``RHYTHM_BENCH_OUT=bench/results`` writes them there on purpose. The terminal summary names the files.
"""
from __future__ import annotations

import os

import pytest

RESULTS: dict[str, list[dict]] = {}
WRITTEN: list[str] = []      # the result files of this session, named in the terminal summary


def record(suite: str, benchmark, **fields) -> None:
    """Keep one benchmark's statistics (when timing was on) and extra fields for the suite's JSON file."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the target ran once, untimed
        return
    timing = {name: getattr(stats.stats, name) for name in ("min", "median", "mean", "max", "stddev", "rounds")}
    RESULTS.setdefault(suite, []).append(dict(fields, seconds=timing))


@pytest.fixture(scope="session", autouse=True)
def write_results(tmp_path_factory):
    yield
    if not RESULTS:
        return
    from bench.records import describe_machine, write_result

    from . import test_bench_cpu

    out_dir = os.environ.get("RHYTHM_BENCH_OUT") or str(tmp_path_factory.mktemp("bench_results"))
    machine = describe_machine()
    for suite, rows in RESULTS.items():
        what, settings, summary = test_bench_cpu.SUMMARIES[suite](rows)
        path = os.path.join(out_dir, f"{suite}_pytest.json")
        write_result(path, f"{suite}_pytest", what, machine=machine,
                     settings=dict(settings, runner="pytest bench --benchmark-only"),
                     records=[{"kind": "measurement", **row} for row in rows],
                     summary=dict(summary, **contention_note(machine)), quiet=True)
        WRITTEN.append(path)


def pytest_terminal_summary(terminalreporter):
    """Name the result files (the session fixture above wrote them while tearing down, before this summary)."""
    for path in WRITTEN:
        terminalreporter.write_line(f"rhythm bench: wrote {path}")


def contention_note(machine: dict) -> dict:
    """A warning stored with the results when the machine was busier than its cores at the start."""
    load, cores = machine["load_average_at_start"][0], machine["cpu_count"] or 1
    if load <= cores:
        return {}
    return {"note": f"contended machine: load average {load:.1f} on {cores} cores at the start; the timings "
                    "and the child processes' peak-RSS deltas (resident pages) are not representative"}
