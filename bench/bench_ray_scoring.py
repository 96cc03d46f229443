"""``rhythm score --ray`` against the single-process ``rhythm score`` on the bundled SmolLM2-135M (CPU).

The same input (``--rows`` token rows of ``--prompt`` + ``--response`` random token ids, seeded) is scored three
ways, each as its own command in a fresh process, one after the other: ``rhythm score`` (one process, torch's
default threads), and ``rhythm score --ray --workers N`` for N = 1 and 2 (a local Ray instance started by the
command; one CPU and one torch thread per worker). The Ray outputs are checked to hold every id once, with
the same values as the single-process output at the contract's tolerance (section 7 of docs/definitions.md;
bitwise equality across blocks and micro-batches is tested in tests/test_ray_scoring.py).

Reported per way: the whole command's wall time and rows / wall time (Ray and model start-up included: each
worker loads the model itself), and the steady rate: the output is sampled every 0.1 s (JSONL lines, rows of
the part files) and the rows written after the first sample that saw any are divided by the time from that
sample to the end (start-up excluded).

    python bench/bench_ray_scoring.py [--rows 48] [--model DIR] [--out bench/results/ray_scoring_cpu.json]

The result is a ``rhythm-bench/1`` file (bench/records.py): one record of kind "run" per way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _input(path: Path, rows: int, prompt: int, response: int, vocab: int) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for i in range(rows):
            ids = torch.randint(0, vocab, (prompt + response,), generator=g).tolist()
            f.write(json.dumps({"id": f"r{i}", "prompt_ids": ids[:prompt], "response_ids": ids[prompt:]}) + "\n")


def _command(args: list[str], rows_written) -> tuple[float, list]:
    """Run one command; (wall seconds, [(seconds since start, rows written)] sampled every 0.1 s)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rhythm.app.cli", *args], env=env, stderr=subprocess.PIPE,
                            text=True)
    samples = []
    while proc.poll() is None:
        samples.append((time.perf_counter() - start, rows_written()))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{err[-3000:]}")
    return wall, samples + [(wall, rows_written())]


def _steady(samples) -> dict:
    """Rows per second from the first sample with rows written to the end (start-up excluded: the first
    micro-batch or block, written before the first such sample, is not counted)."""
    first = next((t, n) for t, n in samples if n > 0)
    last = samples[-1]
    span = last[0] - first[0]
    return {"steady_rows": last[1] - first[1], "steady_s": round(span, 2),
            "steady_rows_per_s": round((last[1] - first[1]) / span, 3) if span > 0 else None}


def _jsonl_rows(path: Path):
    return lambda: path.read_bytes().count(b"\n") if path.exists() else 0


def _part_rows(folder: Path):
    import pyarrow.parquet as pq

    def count():
        return sum(pq.read_metadata(p).num_rows for p in folder.glob("part-*.parquet")) if folder.exists() else 0
    return count


def _check(folder: Path, reference: Path) -> float:
    """Every id once; the largest difference from the single-process rows over the signals and gammas."""
    import pyarrow.dataset as pds

    want = {r["id"]: r for r in map(json.loads, reference.read_text().splitlines())}
    got = pds.dataset(str(folder), format="parquet").to_table().to_pylist()
    assert sorted(r["id"] for r in got) == sorted(want), "ids lost or doubled"
    worst = 0.0
    for row in got:
        for key in ("waad", "fai", "gamma_coupled", "gamma_local", "gamma_global"):
            worst = max([worst] + [abs(a - b) for a, b in zip(row[key], want[row["id"]][key])])
    return worst


def main() -> None:
    from bench.records import bench_parser, describe_machine, write_result

    parser = bench_parser(__doc__, "ray_scoring_cpu.json", rows=48, prompt=32, response=160, micro_batch_size=4,
                          block_rows=4)
    parser.add_argument("--model", default=None, help="a local model instead of the bundled SmolLM2")
    args = parser.parse_args()
    import ray
    from rhythm.app.common import ModelSource

    machine = dict(describe_machine(), ray=ray.__version__)
    vocab, _ = ModelSource(args.model).limits()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    src = work / "in.jsonl"
    _input(src, args.rows, args.prompt, args.response, vocab)
    common = ["--input", str(src), "--quiet", "--micro-batch-size", str(args.micro_batch_size),
              *(["--model", args.model] if args.model else [])]
    runs = []
    wall, samples = _command(["score", *common, "--output", str(work / "single.jsonl")],
                             _jsonl_rows(work / "single.jsonl"))
    runs.append({"kind": "run", "way": "rhythm score (one process)", "wall_s": round(wall, 2),
                 "rows_per_s": round(args.rows / wall, 3), **_steady(samples)})
    print(runs[-1], flush=True)
    for workers in (1, 2):
        out = work / f"ray{workers}"
        wall, samples = _command(["score", *common, "--output", str(out), "--ray", "--workers", str(workers),
                                  "--block-rows", str(args.block_rows)], _part_rows(out))
        runs.append({"kind": "run", "way": f"rhythm score --ray --workers {workers}", "wall_s": round(wall, 2),
                     "rows_per_s": round(args.rows / wall, 3), **_steady(samples),
                     "parts": len(list(out.glob("part-*.parquet"))),
                     "max_abs_diff_vs_one_process": _check(out, work / "single.jsonl")})
        print(runs[-1], flush=True)
    machine["load_average_at_end"] = os.getloadavg()
    write_result(args.out, "ray_scoring",
                 f"rhythm score --ray (1 and 2 workers) vs rhythm score, {args.model or 'bundled SmolLM2-135M'}, CPU",
                 settings={"model": args.model or "bundled SmolLM2-135M-Instruct (GGUF, float32)", "rows": args.rows,
                           "prompt_tokens": args.prompt, "response_tokens": args.response,
                           "micro_batch_size": args.micro_batch_size, "block_rows": args.block_rows,
                           "strategies": "coupled,local,global",
                           "method": "each way is one command in a fresh process, wall time including start-up "
                                     "(every Ray worker loads the model itself); Ray workers: 1 CPU and 1 torch "
                                     "thread each; the one-process command uses torch's default threads"},
                 records=runs, machine=machine,
                 summary={"max_abs_diff_vs_one_process": max(r.get("max_abs_diff_vs_one_process", 0.0)
                                                             for r in runs)})


if __name__ == "__main__":
    main()
