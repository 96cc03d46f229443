"""CPU benchmark: what batch invariance costs the scorer (docs/definitions.md section 7, batch invariance).

``RhythmScorer.score`` over 8 left-padded sequences of 256-512 tokens (response: the last three quarters) in
micro-batches of 4, on a random-init model of SmolLM2-135M's shape (Llama, 30 layers, hidden 576, 9 heads /
3 KV heads, fp32, sdpa; no download). Each measurement runs in a fresh subprocess on the tree given by
``--tree`` (default: this one), so one run can set the code before a change against the code after it on the
same machine, interleaved (before, after, before, after, ...). Per process: the minimum over ``--repeats``
timed calls after one warm-up call, and the largest difference of WAAD / FAI between micro-batches of 1 and
of 4 (0.0 = bitwise batch-invariant).

    python bench/bench_scorer_batches.py --before /path/to/tree_before [--rounds 2] [--out bench/results/scorer_batches_cpu.json]
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


def worker(repeats: int) -> dict:
    """Runs inside the subprocess (the tree under test first on sys.path)."""
    import torch

    import rhythm
    from rhythm import RhythmScorer

    model, ids, mask, response = model_and_rows()
    scorer = RhythmScorer(model, micro_batch_size=MICRO_BATCH)
    batched = scorer.score(ids, mask, response)                           # warm-up, and the micro-batch-4 result
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        scorer.score(ids, mask, response)
        times.append(time.perf_counter() - begin)
    single = RhythmScorer(model, micro_batch_size=1).score(ids, mask, response)
    return {"rhythm_file": rhythm.__file__, "seconds": min(times), "all_seconds": times,
            "max_diff_micro_batch_1_vs_4": {name: (getattr(single, name) - getattr(batched, name)).abs().max().item()
                                            for name in ("waad", "fai")},
            "torch_threads": torch.get_num_threads()}


def run_in_subprocess(tree: Path, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tree / '.shim'}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    # this file loaded by path, so that rhythm (and everything else) comes from the tree under test
    code = ("import importlib.util, json; spec = importlib.util.spec_from_file_location('bench_scorer_batches', %r); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "print('RESULT' + json.dumps(module.worker(%d)))") % (str(Path(__file__).resolve()), repeats)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tree), env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    return {"failed": True, "error": ((proc.stderr or "").strip().splitlines() or ["no output"])[-1][:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the code before the change")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the code after the change (default: this tree)")
    parser.add_argument("--label-before", default="before")
    parser.add_argument("--label-after", default="after")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--after-first", action="store_true", help="each round runs the code after the change first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/scorer_batches_cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    runs = []
    for round_ in range(args.rounds):
        order = ((args.label_before, args.before), (args.label_after, args.tree))
        for label, tree in (order[::-1] if args.after_first else order):
            result = dict(run_in_subprocess(tree.resolve(), args.repeats), code=label, round=round_)
            runs.append(result)
            print(json.dumps(result))
            write(args.out, runs, args)
    write(args.out, runs, args)


WHAT = ("RhythmScorer.score, 8 left-padded sequences of 256-512 tokens in micro-batches of 4, the code before vs "
        "after a change, each in a fresh subprocess")


def write(path: str, runs: list, args, note: str | None = None) -> dict:
    """The result file (bench/records.py schema): one measurement record per subprocess run."""
    from bench.records import write_result

    best = {label: min((r["seconds"] for r in runs if r["code"] == label and not r.get("failed")), default=None)
            for label in (args.label_before, args.label_after)}
    summary = {"best_seconds": best}
    if all(best.values()):
        summary["time_ratio_after_over_before"] = best[args.label_after] / best[args.label_before]
    if note:
        summary["note"] = note
    settings = {"model": "random-init Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9/3 heads), fp32, sdpa",
                "lengths": LENGTHS, "micro_batch_size": MICRO_BATCH, "repeats": args.repeats,
                "time": "min of the repeats after one warm-up call, in a fresh subprocess per run",
                "exactness": "max abs difference of WAAD / FAI between micro-batches of 1 and of 4"}
    return write_result(path, "scorer_batches", WHAT, settings=settings,
                        records=[dict(r, kind="measurement") for r in runs], summary=summary)


if __name__ == "__main__":
    main()
