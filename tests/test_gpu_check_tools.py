"""The GPU check's own tools, on CPU: the independent reference it holds the kernels to, the section 7
comparison, and the pinned-config file (rhythm_kernels.tuned_configs)."""
from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from reference_check import compare, reference_metrics  # noqa: E402

from rhythm_kernels import tuned_configs  # noqa: E402
from rhythm_kernels.naive import naive_attention_metrics  # noqa: E402
from rhythm_kernels.segments import segments_from_mask  # noqa: E402

HORIZONS = {"band": (10, 100), "short": (3, 20), "full": (10, None)}


@pytest.mark.parametrize("budget", [1 << 30, 4 * 150])      # one block; blocks of a few rows
def test_reference_matches_the_oracle(budget):
    """Row blocks or not, the check's reference is the materialised definition (fp64)."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 150, 16, generator=gen) * 1.5, torch.randn(1, 2, 150, 16, generator=gen) * 1.5
    ours = reference_metrics(q, k, scale=0.25, window=7, horizons=HORIZONS, response_start=30, budget=budget)
    segments = segments_from_mask(None, 1, 150, torch.tensor([30]), q.device)
    for name, horizon in HORIZONS.items():
        want = naive_attention_metrics(q.double(), k.double(), None, segments, window=7, horizon=horizon, scale=0.25)
        for metric in ("lse", "distance", "waad"):
            torch.testing.assert_close(ours[metric], want[metric][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours[f"fai:{name}"], want["fai"][0], rtol=1e-12, atol=1e-12)


def test_reference_low_precision_is_computed_in_that_dtype():
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 64, 16, generator=gen), torch.randn(1, 2, 64, 16, generator=gen)
    low = reference_metrics(q, k, scale=0.25, window=10, horizons={"band": (10, 100)}, compute_dtype=torch.bfloat16)
    exact = reference_metrics(q, k, scale=0.25, window=10, horizons={"band": (10, 100)})
    assert low["lse"].dtype == torch.bfloat16
    assert 0 < (low["distance"].double() - exact["distance"]).abs().max() < 1.0


def test_compare_fp32_bound_and_nan():
    want = {"waad": torch.tensor([[2.0, 3.0]], dtype=torch.float64),
            "distance": torch.tensor([[100.0, 0.5]], dtype=torch.float64)}
    inside = {"waad": want["waad"] + 0.9e-4, "distance": want["distance"] + torch.tensor([[0.9e-2, 0.9e-4]])}
    outside = {"waad": want["waad"] + 1.1e-4, "distance": want["distance"] + torch.tensor([[1.1e-2, 0.0]])}
    assert all(entry["ok"] for entry in compare(inside, want, None, torch.float32).values())
    result = compare(outside, want, None, torch.float32)
    assert not result["waad"]["ok"] and not result["distance"]["ok"]
    assert result["distance"]["ratio"] == pytest.approx(1.1, rel=1e-3)          # scaled by max(1, value)
    nan = compare({"waad": torch.tensor([[math.nan, 3.0]])}, want, None, torch.float32)["waad"]
    assert not nan["ok"] and nan["ratio"] == math.inf


def test_compare_low_precision_bound():
    want = {"lse": torch.tensor([[1.0, 2.0]], dtype=torch.float64)}
    low = {"lse": torch.tensor([[1.01, 2.0]], dtype=torch.float64)}                 # bound 2 * 0.01 + 3e-5
    assert compare({"lse": want["lse"] + 0.02}, want, low, torch.bfloat16)["lse"]["ok"]
    assert not compare({"lse": want["lse"] + 0.021}, want, low, torch.bfloat16)["lse"]["ok"]


def _entry(len_key, block_m, gpu="NVIDIA H200", mode="HAS_V=False"):
    return {"gpu": gpu, "kernel": "stats", "head_dim": 128, "dtype": "bfloat16", "mode": mode, "len_key": len_key,
            "config": {"BLOCK_M": block_m, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}}


def test_pinned_config_takes_the_nearest_length_bucket():
    entries = [_entry(2048, 64), _entry(32768, 128), _entry(8192, 128, mode="HAS_V=True")]
    pick = lambda n, **kw: tuned_configs.pinned_config("stats", kw.get("gpu", "NVIDIA H200"), 128, "bfloat16",  # noqa: E731
                                                       kw.get("mode", "HAS_V=False"), n, entries)
    assert pick(2048)["BLOCK_M"] == 64 and pick(4096)["BLOCK_M"] == 64          # 4096: nearer 2048 than 32768
    assert pick(16384)["BLOCK_M"] == 128 and pick(1 << 20)["BLOCK_M"] == 128
    assert pick(8192)["BLOCK_M"] == 128                                         # a tie in log2 goes to the longer
    assert pick(2048, mode="HAS_V=True")["BLOCK_M"] == 128                      # only that mode's entries
    assert pick(2048, gpu="NVIDIA H100 80GB HBM3") is None                       # another GPU: autotune


def test_pinned_config_file_roundtrip(tmp_path, monkeypatch):
    path = str(tmp_path / "tuned_configs.json")
    assert tuned_configs.write_entries(path, [_entry(2048, 64), _entry(8192, 128)]) == 2
    assert tuned_configs.write_entries(path, [_entry(2048, 128)]) == 2           # a later pick replaces
    monkeypatch.setenv("RHYTHM_TRITON_CONFIGS", path)
    assert tuned_configs.pinned_config("stats", "NVIDIA H200", 128, "bfloat16", "HAS_V=False", 2048)["BLOCK_M"] == 128
    (tmp_path / "bad.json").write_text(json.dumps({"entries": {}}))
    with pytest.raises(ValueError, match="format"):
        tuned_configs.load_entries(str(tmp_path / "bad.json"))


def test_autotuner_picks_become_entries(monkeypatch):
    """The autotuner's cache key (Triton 3.6: the key arguments, then the dtypes of the tensor arguments, Q
    first) is read into one file entry per pick."""
    from rhythm_kernels import triton_stats

    tuner = triton_stats._stats_kernel_tuned
    key = (8192, 128, False, "torch.bfloat16", "torch.bfloat16", "torch.bfloat16")
    monkeypatch.setattr(tuner, "cache", {key: triton_stats.STATS_CONFIGS[1]})
    entries = [e for e in tuned_configs.entries_from_autotuners("NVIDIA H200") if e["kernel"] == "stats"]
    assert entries == [{"gpu": "NVIDIA H200", "kernel": "stats", "head_dim": 128, "dtype": "bfloat16",
                        "mode": "HAS_V=False", "len_key": 8192, "config": triton_stats.STATS_CONFIGS[1].all_kwargs()}]


def test_warm_shapes_specialise_like_the_benchmark_shapes():
    """The warm step compiles at T = 256; the benchmark launches at 8K and 32K. Triton's binder must give
    both the same specialisation (signature, constants, divisibility), or the warm fills the cache with
    kernels the benchmark never loads. Runs the binder without the interpreter, in a subprocess."""
    import os
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    script = """
import sys
sys.path.insert(0, 'bench')
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
import kernel_variants as kv
backend = make_backend(GPUTarget('cuda', 90, 32))
def spec(job):
    out = []
    for fn, args, kwargs, label in kv.record_launches(job):
        signature, constexprs, attrs, options = kv._specialise(fn, args, kwargs, backend)
        out.append((label, signature, {k: str(v) for k, v in constexprs.items()}, attrs, str(options)))
    return out
for kind, flag in (('stats', True), ('influence', False)):
    warm = spec(kv.Job(kind, 'bf16', 128, flag, config=0))
    for length in (8192, 32768):
        assert spec(kv.Job(kind, 'bf16', 128, flag, length=length, config=0)) == warm, (kind, length)
print('same')
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "same" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


# --------------------------------------------------------------------------------------------------------
# The one record schema (bench/records.py)
# --------------------------------------------------------------------------------------------------------
def test_result_file_and_stream_share_one_schema(tmp_path, monkeypatch):
    import records

    path = tmp_path / "r.json"
    records.write_result(str(path), "demo", "a demo", settings={"T": 8}, records=[{"kind": "measurement", "ms": 1.0}],
                         summary={"ratio": 0.5}, quiet=True)
    stored = json.loads(path.read_text())
    assert list(stored) == ["schema", "benchmark", "what", "utc", "machine", "settings", "records", "summary"]
    assert stored["schema"] == records.SCHEMA and {"torch", "cpu_count", "cuda_available"} <= set(stored["machine"])
    with pytest.raises(ValueError, match="without a 'kind'"):
        records.write_result(str(path), "demo", "a demo", settings={}, records=[{"ms": 1.0}], quiet=True)

    stream = records.Stream(str(tmp_path), "bench")
    stream.emit("machine", **records.describe_machine())
    stream.emit("bench", method="x", ms=2.0)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert records.main(["emit", "cuda_tests", "step_done", "rc=0", "seconds=3", "box_s=60"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["schema"], r["benchmark"], r["step"], r["kind"]) for r in lines] == [
        (records.SCHEMA, "gpu_check", "bench", "machine"), (records.SCHEMA, "gpu_check", "bench", "bench"),
        (records.SCHEMA, "gpu_check", "cuda_tests", "step_done")]
    assert lines[2]["rc"] == 0 and lines[2]["box_s"] == 60                      # values parsed as JSON
    summary = json.loads(pathlib.Path(stream.write_result("s.json", "demo", settings={}, kinds=("bench",)))
                         .read_text())
    assert [r["method"] for r in summary["records"]] == ["x"] and summary["machine"]["torch"] == torch.__version__


def test_bench_scripts_write_json_only_through_records():
    """One module writes benchmark results: no other bench/ script dumps JSON itself."""
    bench = pathlib.Path(__file__).resolve().parents[1] / "bench"
    writers = [p.name for p in bench.glob("*.py") if p.name != "records.py" and "json.dump(" in p.read_text()]
    assert not writers, f"these bench scripts write JSON themselves instead of bench/records.py: {writers}"
