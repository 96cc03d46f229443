"""What rhythm credit adds to a TRL GRPO step: plain ``GRPOTrainer`` against ``RhythmGRPOTrainer`` in one run.

SmolLM2-135M-Instruct (the bundled GGUF, float32, CPU), 8 completions per step (one prompt x 8 generations,
``per_device_train_batch_size=8``), up to 128 completion tokens, the paper's coupled credit on the fused path
(TRL's aligned defaults: the metrics are recorded in the training forward). Both trainers live in one process
and run their steps in turn (each ``train()`` in its own thread; a callback hands the turn over at step
boundaries, so exactly one trainer computes at any time), the order alternated step by step. Before each step
the torch seed is reset to the same value, and the learning rate is 0 (the optimizer still runs), so both
trainers sample the same completions every step (checked: ``same_completions``) and their steps do the same
work apart from the credit.

Reported (medians over the steps after the warm-up step): whole-step wall time of each trainer; the added work
timed directly (``rhythm_added_s``: the metrics inside the training forward plus the credit and the shaping, the
trainer's own timer); forwards per step outside generation, and their difference (``extra_forwards``); the
split of a step into generation, training forward, backward and the rest (optimizer, rewards, logging).

    python bench/bench_trainer_overhead.py [--steps 6] [--out bench/results/trainer_overhead_cpu.json]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WHAT = "TRL GRPO step: plain GRPOTrainer vs RhythmGRPOTrainer (fused credit), same process"
OBSERVED = ("same_completions", "rhythm_frac_rows_measured", "wall_s", "load")   # summary fields measured, not derived
PROMPTS = ["Explain why the sky is blue.", "Write a short poem about rivers.", "List three uses of copper.",
           "How do plants make food?", "Describe a busy market.", "What is a prime number?",
           "Give advice to a new student.", "Tell a story about a lost key."]


def vowel_share(completions, **kwargs):
    """A reward that separates completions of one prompt (so few GRPO groups have all-equal rewards)."""
    return [sum(ch in "aeiou" for ch in c.lower()) / max(len(c), 1) for c in completions]


class TurnTaking:
    """Runs the trainers' steps one at a time in a fixed schedule [(name, step), ...]. A trainer waits at the
    start of each step for its turn and keeps the turn until it reaches its next step (or ends), so its
    between-step work (logging) never overlaps the other's timed step."""

    def __init__(self, schedule, seed):
        self.schedule, self.seed = schedule, seed
        self.position = 0
        self.cond = threading.Condition()
        self.holder = None

    def wait_turn(self, name, step):
        import torch

        with self.cond:
            if self.holder == name:
                self.holder = None
                self.position += 1
                self.cond.notify_all()
            self.cond.wait_for(lambda: self.position < len(self.schedule) and self.schedule[self.position] == (name, step))
            self.holder = name
        torch.manual_seed(self.seed + step)     # the same sampling in both trainers' step `step`

    def release(self, name):
        with self.cond:
            if self.holder == name:
                self.holder = None
                self.position += 1
                self.cond.notify_all()


def instrument(trainer, name, turns, record):
    """Times the parts of each step and counts decoder forwards outside generation."""
    import torch
    from transformers import TrainerCallback

    state = {"in_generate": 0, "step": None}

    def add(key, seconds):
        record[state["step"]][key] = record[state["step"]].get(key, 0.0) + seconds

    def timed(method, key, when=lambda *a, **k: True):
        def wrapper(*args, **kwargs):
            if not when(*args, **kwargs):
                return method(*args, **kwargs)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                add(key, time.perf_counter() - start)
        return wrapper

    generate = trainer._generate

    def counted_generate(*args, **kwargs):
        state["in_generate"] += 1
        try:
            return timed(generate, "generation_s")(*args, **kwargs)
        finally:
            state["in_generate"] -= 1

    trainer._generate = counted_generate
    trainer._get_per_token_logps_and_entropies = timed(trainer._get_per_token_logps_and_entropies,
                                                       "training_forward_s", lambda *a, **k: torch.is_grad_enabled())
    trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward_s")
    decoder = trainer.model.model

    def count(*_):
        if not state["in_generate"] and state["step"] is not None:
            add("forwards", 1)

    decoder.register_forward_pre_hook(count)
    outer = trainer

    class Callback(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            turns.wait_turn(name, st.global_step)
            state["step"] = st.global_step
            record[st.global_step] = {"forwards": 0, "added_before": getattr(outer, "rhythm_added_seconds", 0.0),
                                      "start": time.perf_counter()}

        def on_step_end(self, args, st, control, **kwargs):
            rec = record[state["step"]]
            rec["step_s"] = time.perf_counter() - rec.pop("start")
            rec["rhythm_added_s"] = getattr(outer, "rhythm_added_seconds", 0.0) - rec.pop("added_before")

        def on_train_end(self, args, st, control, **kwargs):
            turns.release(name)

    trainer.add_callback(Callback())


def completions_digest(trainer, record):
    """Hash of the completion ids of each generation batch (to check both trainers sampled the same)."""
    original = trainer._generate_and_score_completions

    def wrapped(inputs):
        out = original(inputs)
        ids = out["completion_ids"][out["completion_mask"].bool()].cpu().numpy().tobytes()
        step = trainer.state.global_step
        record.setdefault(step, {})["digest"] = hashlib.sha1(ids).hexdigest()
        record[step]["completion_tokens"] = int(out["completion_mask"].sum())
        return out

    trainer._generate_and_score_completions = wrapped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps per trainer, the first one a warm-up (>= 5)")
    parser.add_argument("--completion-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "trainer_overhead_cpu.json"))
    parser.add_argument("--resummarize", metavar="JSON", help="recompute the medians of a stored run and exit")
    args = parser.parse_args(argv)
    if args.resummarize:
        return resummarize(args.resummarize)
    if args.steps < 5:
        parser.error("--steps must be >= 5 (one warm-up step and at least 4 measured)")

    import datasets
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from bench.records import describe_machine
    from rhythm.integrations.trl import RhythmCreditConfig, RhythmGRPOTrainer
    from rhythm.models import load_model

    machine = describe_machine()
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    model, tokenizer = load_model()
    tokenizer.padding_side = "left"
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS * 4})

    def grpo_args(name):
        return GRPOConfig(output_dir=f"/tmp/bench_trainer_overhead/{name}", per_device_train_batch_size=8,
                          num_generations=8, max_completion_length=args.completion_length, max_steps=args.steps,
                          learning_rate=0.0, report_to="none", use_cpu=True, bf16=False, logging_steps=1,
                          save_strategy="no", seed=args.seed, disable_tqdm=True, temperature=1.0)

    plain = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=vowel_share, args=grpo_args("plain"),
                        train_dataset=dataset, processing_class=tokenizer)
    rhythm = RhythmGRPOTrainer(model=copy.deepcopy(model), reward_funcs=vowel_share, args=grpo_args("rhythm"),
                               train_dataset=dataset, processing_class=tokenizer,
                               rhythm_config=RhythmCreditConfig(strategy="coupled"), credit_pass="fused")
    del model
    schedule = []
    for step in range(args.steps):
        order = ["plain", "rhythm"] if step % 2 == 0 else ["rhythm", "plain"]
        schedule += [(name, step) for name in order]
    turns = TurnTaking(schedule, args.seed)
    records = {"plain": {}, "rhythm": {}}
    digests = {"plain": {}, "rhythm": {}}
    for name, trainer in (("plain", plain), ("rhythm", rhythm)):
        instrument(trainer, name, turns, records[name])
        completions_digest(trainer, digests[name])
    errors = []

    def run(trainer, name):
        try:
            trainer.train()
        except BaseException as e:  # noqa: BLE001 - reported, and the other trainer is released
            errors.append(f"{name}: {type(e).__name__}: {e}")
            turns.release(name)
            with turns.cond:
                turns.schedule = [s for s in turns.schedule if s[0] != name]
                turns.cond.notify_all()

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(t, n)) for n, t in (("plain", plain), ("rhythm", rhythm))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    same = all(digests["plain"][s]["digest"] == digests["rhythm"][s]["digest"] for s in range(args.steps))
    logs = [h for h in rhythm.state.log_history if "rhythm/frac_rows_measured" in h]
    # one record per (trainer, step): its measurements and the completions it sampled
    step_records = [{"kind": "step", "trainer": name, "step": s, **records[name][s],
                     "completion_tokens": digests[name][s]["completion_tokens"]}
                    for s in range(args.steps) for name in ("plain", "rhythm")]
    settings = {"model": "SmolLM2-135M-Instruct (bundled GGUF, de-quantised to float32)", "device": "cpu",
                "per_device_train_batch_size": 8, "num_generations": 8, "completions_per_step": 8,
                "max_completion_length": args.completion_length, "steps_per_trainer": args.steps,
                "warmup_steps": 1, "learning_rate": 0.0, "strategy": "coupled", "credit_pass": "fused",
                "order": "alternated each step", "torch_threads": torch.get_num_threads(),
                "trl": __import__("trl").__version__}
    observed = {"same_completions": same, "rhythm_frac_rows_measured": [h["rhythm/frac_rows_measured"] for h in logs],
                "wall_s": time.perf_counter() - started,
                "load": {"uptime_start": uptime_start, "uptime_end": uptime_end,
                         "note": "the machine's 2 cores are shared with other agents' jobs; see the load averages"}}
    write_summary(args.out, machine, settings, step_records, observed)
    return 0


def per_step_of(step_records: list[dict]) -> dict:
    """{trainer: [that trainer's step records, in step order]}."""
    per_step = {}
    for record in sorted((r for r in step_records if r["kind"] == "step"), key=lambda r: r["step"]):
        per_step.setdefault(record["trainer"], []).append(record)
    return per_step


def write_summary(path: str, machine: dict, settings: dict, step_records: list[dict], observed: dict,
                  **extra) -> None:
    """The result file (bench/records.py): the step records and, as summary, what was observed and the medians."""
    from bench.records import write_result

    summary = dict(observed, **summarize(per_step_of(step_records)), **extra)
    write_result(path, "trainer_overhead", WHAT, machine=machine, settings=settings, records=step_records,
                 summary=summary)
    report(summary)


def summarize(per_step: dict) -> dict:
    """Medians over the steps after the warm-up (step 0) of the per-step measurements; the split of a step is
    taken step by step (other = step - generation - training forward - backward), then its median."""
    def median(name, key):
        return statistics.median(step.get(key, 0.0) for step in per_step[name][1:])

    for steps in per_step.values():
        for step in steps:
            step["other_s"] = step["step_s"] - sum(step.get(k, 0.0) for k in
                                                   ("generation_s", "training_forward_s", "backward_s"))
    plain_step, rhythm_step = median("plain", "step_s"), median("rhythm", "step_s")
    added = median("rhythm", "rhythm_added_s")
    parts = ("generation_s", "training_forward_s", "backward_s", "other_s")
    split = {name: {key: median(name, key) for key in parts} for name in ("plain", "rhythm")}
    for name in split:
        split[name]["shares_of_step"] = {
            key: statistics.median(step.get(key, 0.0) / step["step_s"] for step in per_step[name][1:]) for key in parts}
    return {
        "plain_step_s": plain_step,
        "rhythm_step_s": rhythm_step,
        "rhythm_added_s": added,
        "added_share_of_plain_step": added / plain_step,
        "step_difference_s": rhythm_step - plain_step,
        "step_time_range_s": {n: [min(s["step_s"] for s in per_step[n][1:]), max(s["step_s"] for s in per_step[n][1:])]
                              for n in per_step},
        "extra_forwards": median("rhythm", "forwards") - median("plain", "forwards"),
        "forwards_per_step_outside_generation": {n: median(n, "forwards") for n in ("plain", "rhythm")},
        "split": split,
    }


def report(result: dict) -> None:
    added, plain = result["rhythm_added_s"], result["plain_step_s"]
    print(f"plain step {plain:.2f} s, rhythm step {result['rhythm_step_s']:.2f} s, added work {added * 1e3:.1f} ms "
          f"({100 * added / plain:.2f}% of a plain step), extra forwards {result['extra_forwards']}, "
          f"same completions: {result['same_completions']}")


def resummarize(path: str) -> int:
    """Recompute the summary of a stored run (bench/records.py's schema) from its step records; nothing is
    re-measured."""
    import json

    with open(path) as handle:
        stored = json.load(handle)
    if "schema" not in stored:
        raise SystemExit(f"{path}: written before bench/records.py's schema (its per_step has no step records); "
                         "rerun the benchmark")
    keep = {key: value for key, value in stored["summary"].items() if key in OBSERVED}
    write_summary(path, stored["machine"], stored["settings"], stored["records"], keep,
                  summarized_by="--resummarize (medians recomputed from the step records; nothing re-measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
