"""``pytest bench`` (the pytest-benchmark suite) writes its result files into a temporary folder and names them,
so running it never changes the files committed under bench/results/ (it rewrote bench/results/*_pytest.json,
relative to the working directory, before)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _committed_results() -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (ROOT / "bench" / "results").glob("*")}


def test_bench_suite_writes_outside_the_tree(tmp_path):
    pytest.importorskip("pytest_benchmark")
    before = _committed_results()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path), RHYTHM_BENCH_CREDIT_SHAPE="4 256",
               OMP_NUM_THREADS="1")
    env.pop("RHYTHM_BENCH_OUT", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                           str(ROOT / "bench" / "test_bench_cpu.py"), "-k", "test_credit and local"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _committed_results() == before
    assert not (tmp_path / "bench").exists()                  # nothing relative to the working directory
    written = [line.split("rhythm bench: wrote ", 1)[1] for line in proc.stdout.splitlines()
               if line.startswith("rhythm bench: wrote ")]
    assert len(written) == 1 and Path(written[0]).name == "credit_cpu_pytest.json", proc.stdout[-3000:]
    path = Path(written[0])
    assert ROOT not in path.parents
    result = json.loads(path.read_text())
    assert result["schema"] == "rhythm-bench/1" and result["benchmark"] == "credit_cpu_pytest"
    assert [(r["kind"], r["method"], r["B"], r["T"]) for r in result["records"]] == [("measurement", "local", 4, 256)]
