"""CPU benchmark: what the scorer's batch invariance costs (docs/definitions.md section 7, batch invariance).

``RhythmScorer.score`` over 8 left-padded sequences of 256-512 tokens (response: the last three quarters) in
micro-batches of 4, on a random-init model of SmolLM2-135M's shape (Llama, 30 layers, hidden 576, 9 heads /
3 KV heads, fp32, sdpa; no download), in two modes measured in the same run, interleaved (one, the other, one,
the other, ...), each measurement in a fresh subprocess:

- ``per_sequence``: ``batch_invariant=True`` (the default), one forward per sequence over exactly its tokens;
- ``batched``: ``batch_invariant=False``, one forward per micro-batch of 4 (padded to its longest row).

Per process: the minimum over ``--repeats`` timed calls after one warm-up call, the process's peak resident
memory, and the largest difference of WAAD / FAI between micro-batches of 1 and of 4 in that mode
(0.0 = bitwise batch-invariant on this machine).

    python bench/bench_scorer_batches.py [--rounds 2] [--repeats 3] [--out bench/results/scorer_batches_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = [512, 448, 384, 320, 500, 256, 420, 360]
MICRO_BATCH = 4
MODES = {"per_sequence": True, "batched": False}   # mode -> batch_invariant


def model_and_rows():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    response = torch.zeros(len(LENGTHS), width, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        ids[b, width - n:] = torch.randint(0, config.vocab_size, (n,), generator=gen)
        mask[b, width - n:] = 1
        response[b, width - 3 * n // 4:] = True
    return model, ids, mask, response


def worker(mode: str, repeats: int) -> dict:
    """Runs inside the subprocess: one mode's timing, peak memory and exactness."""
    import resource

    import torch

    from rhythm import RhythmScorer

    model, ids, mask, response = model_and_rows()
    invariant = MODES[mode]
    scorer = RhythmScorer(model, micro_batch_size=MICRO_BATCH, batch_invariant=invariant)
    batched = scorer.score(ids, mask, response)                           # warm-up, and the micro-batch-4 result
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        scorer.score(ids, mask, response)
        times.append(time.perf_counter() - begin)
    single = RhythmScorer(model, micro_batch_size=1, batch_invariant=invariant).score(ids, mask, response)
    return {"mode": mode, "batch_invariant": invariant, "seconds": min(times), "all_seconds": times,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "max_diff_micro_batch_1_vs_4": {name: (getattr(single, name) - getattr(batched, name)).abs().max().item()
                                            for name in ("waad", "fai")},
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run_in_subprocess(mode: str, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / ".shim"),
                                                       os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = ("import json, bench.bench_scorer_batches as b; "
            f"print('RESULT' + json.dumps(b.worker({mode!r}, {repeats})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    return {"mode": mode, "failed": True,
            "error": ((proc.stderr or "").strip().splitlines() or ["no output"])[-1][:300]}


WHAT = ("RhythmScorer.score, 8 left-padded sequences of 256-512 tokens in micro-batches of 4: one forward per "
        "sequence (batch_invariant, the default) against one forward per micro-batch, in the same run, each "
        "measurement in a fresh subprocess")


def write(path: str, runs: list, args) -> dict:
    """The result file (bench/records.py schema): one measurement record per subprocess run."""
    from bench.records import write_result

    best = {mode: min((r["seconds"] for r in runs if r.get("mode") == mode and not r.get("failed")), default=None)
            for mode in MODES}
    summary = {"best_seconds": best}
    if all(best.values()):
        summary["time_ratio_per_sequence_over_batched"] = best["per_sequence"] / best["batched"]
    settings = {"model": "random-init Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9/3 heads), fp32, sdpa",
                "lengths": LENGTHS, "micro_batch_size": MICRO_BATCH, "repeats": args.repeats,
                "time": "min of the repeats after one warm-up call, in a fresh subprocess per run",
                "exactness": "max abs difference of WAAD / FAI between micro-batches of 1 and of 4, per mode"}
    return write_result(path, "scorer_batches", WHAT, settings=settings,
                        records=[dict(r, kind="measurement") for r in runs], summary=summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/scorer_batches_cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    runs = []
    for round_ in range(args.rounds):
        order = list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            result = dict(run_in_subprocess(mode, args.repeats), round=round_)
            runs.append(result)
            print(json.dumps(result), flush=True)
            write(args.out, runs, args)


if __name__ == "__main__":
    main()
