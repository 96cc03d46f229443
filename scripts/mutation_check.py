#!/usr/bin/env python3
"""Mutation check: plant one plausible bug at a time in a copy of the tree and confirm the tests catch it.

Each mutation names the file, the exact source text it replaces (which must occur exactly once, so a
refactor that moves the code makes the check fail loudly instead of silently testing nothing), and the test
selection that must fail. A baseline run of every selection on the unmodified copy must pass first.

    python scripts/mutation_check.py                 # all mutations (about 5-10 minutes on 2 CPU cores)
    python scripts/mutation_check.py --only hhi      # names containing "hhi"
    python scripts/mutation_check.py --json out.json # also write the results as JSON

Exit status 0 when every mutation is caught, 1 when one is missed or cannot be applied. Not part of CI
(it runs the selected tests once per mutation); run it after changing the code or tests it names.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    before: str
    after: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("prompt-rows-in-count", "prompt rows counted in |T(s)| (response start ignored)",
             "kernels/segments.py",
             'first = torch.maximum(s + h_lo, table["response_start"])', "first = s + h_lo",
             ("tests/test_oracle.py", "tests/test_torch_backend.py")),
    Mutation("hhi-exclusive-count", "H_hi exclusive in the count |T(s)|",
             "kernels/segments.py",
             'torch.minimum(table["end"] - 1, s + h_hi)', 'torch.minimum(table["end"] - 1, s + h_hi - 1)',
             ("tests/test_oracle.py", "tests/test_torch_backend.py")),
    # The capture records every path through one step (Capture._record): the same bug, caught through the fused
    # scoring pass and, separately, through the metrics-only recording beside a training forward.
    Mutation("capture-ignores-hhi", "the capture's recording step drops H_hi (fused output + metrics)",
             "rhythm/capture/recording.py",
             "window=request.window, horizon=request.horizon, scale=scaling,",
             "window=request.window, horizon=(request.horizon[0], None), scale=scaling,",
             ("tests/test_capture.py", "tests/test_scorer.py", "-k", "padded or packed")),
    Mutation("capture-beside-ignores-hhi", "the capture's recording step drops H_hi, seen through the metrics-only "
             "recording beside a training forward (TRL)",
             "rhythm/capture/recording.py",
             "window=request.window, horizon=request.horizon, scale=scaling,",
             "window=request.window, horizon=(request.horizon[0], None), scale=scaling,",
             ("tests/test_scorer.py", "-k", "recording")),
    Mutation("score-gamma-shifted", "`rhythm score` writes each gamma column shifted by one token",
             "rhythm/app/score.py",
             'columns.update({f"gamma_{s}": scores.gamma(s, row_ids=ids)',
             'columns.update({f"gamma_{s}": scores.gamma(s, row_ids=ids).roll(1, dims=-1)',
             ("tests/test_score_cli.py", "-k", "columns")),
    Mutation("ray-resume-redoes", "`rhythm score --ray` plans the ids already written again (resume ignored)",
             "rhythm/app/dataset_input.py",
             "        if row_id in done:", "        if row_id in ():",
             ("tests/test_ray_scoring.py", "-k", "same_blocks")),
    Mutation("head-groups-reversed", "head groups sorted the wrong way (H_loc takes the largest d)",
             "rhythm/credit/heads.py",
             "local = torch.sort(d, dim=1, stable=True).indices[:, :n_sel]",
             "local = torch.sort(-d, dim=1, stable=True).indices[:, :n_sel]",
             ("tests/test_heads.py", "tests/test_scorer.py", "-k", "not bundled and not smollm")),
    Mutation("hybrid-samples-every-layer", "a hybrid model's layers sampled as if every layer were softmax attention",
             "rhythm/scoring/scorer.py",
             "self.layers = sample_layers(self.num_layers, attention)", "self.layers = sample_layers(self.num_layers)",
             ("tests/test_scorer.py", "-k", "hybrid")),
    Mutation("scorer-batches-sequences", "the scorer runs a micro-batch in one forward although batch_invariant asks "
             "for one forward per sequence",
             "rhythm/scoring/scorer.py",
             "forwards = [[span] for span in spans] if self.config.batch_invariant else [list(spans)]",
             "forwards = [list(spans)]",
             ("tests/test_batch_invariance.py::test_scorer_bitwise_where_the_models_own_layers_are_not_batch_invariant",)),
    Mutation("triton-kv-head", "wrong kv-head mapping in the Triton stats pass (h % Hkv instead of h // group)",
             "kernels/triton_stats.py",
             "kv_head = (head // group).to(tl.int64)", "kv_head = (head % (n_q_heads // group)).to(tl.int64)",
             ("tests/test_triton_backend.py", "tests/test_triton_properties.py", "-k", "gqa or GQA or ratio")),
)


def copy_tree(dest: Path) -> None:
    """The tracked files (plus untracked, not ignored ones) of the working tree, and the rhythm_kernels link."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "rhythm_kernels").symlink_to("kernels")


def apply(tree: Path, mutation: Mutation) -> str | None:
    """Plant the mutation; returns an error message when its source text is not there exactly once."""
    path = tree / mutation.path
    text = path.read_text()
    count = text.count(mutation.before)
    if count != 1:
        return f"{mutation.path}: expected the text to mutate exactly once, found it {count} times"
    path.write_text(text.replace(mutation.before, mutation.after))
    return None


def run_tests(tree: Path, selection: tuple[str, ...]) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection],
                          cwd=tree, env=env, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    return done.returncode, time.perf_counter() - start, tail[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutations whose name contains this text")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in m.name]
    if not chosen:
        parser.error(f"--only {args.only!r} matches none of {[m.name for m in MUTATIONS]}")
    results, failed = [], False
    with tempfile.TemporaryDirectory(prefix="rhythm-mutation-") as tmp:
        clean = Path(tmp) / "clean"
        clean.mkdir()
        copy_tree(clean)
        baselines = {}
        for mutation in chosen:
            tree = Path(tmp) / mutation.name
            shutil.copytree(clean, tree, symlinks=True)
            if mutation.tests not in baselines:
                baselines[mutation.tests] = run_tests(clean, mutation.tests)
            baseline_rc, _, baseline_tail = baselines[mutation.tests]
            error = apply(tree, mutation)
            if baseline_rc != 0:
                verdict, rc, seconds, tail = "baseline-fails", None, 0.0, baseline_tail
            elif error:
                verdict, rc, seconds, tail = "not-applied", None, 0.0, error
            else:
                rc, seconds, tail = run_tests(tree, mutation.tests)
                verdict = {0: "MISSED", 1: "caught"}.get(rc, "error")
            failed |= verdict != "caught"
            results.append({"name": mutation.name, "what": mutation.what, "verdict": verdict, "rc": rc,
                            "seconds": round(seconds, 1), "tests": list(mutation.tests), "last_line": tail})
            print(f"{verdict:>14}  {mutation.name:<22} {seconds:6.1f} s  {tail}", flush=True)
            shutil.rmtree(tree)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
