"""``run_probe``: generate, perturb, continue, measure, summarise; trials appended as they finish.

Data flow per group of prompts: chat template -> batched greedy responses -> per response one scorer pass
(WAAD, FAI, entropy, selection, head groups) and one full pass keeping q/k (sinks, logits of the
replacements) -> the trials' continuations, batched -> one record per prompt appended to
``DIR/probe_trials.jsonl`` (fsynced per group; a rerun with the same settings skips the prompts already
there, a run with other settings is refused: :mod:`rhythm.app.probe.journal`) -> the summary over every
record -> ``DIR/probe.json`` (settings, summary, every record) and ``DIR/probe.html``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rhythm_kernels.segments import is_integer

from rhythm.app.common import chat_ids
from rhythm.app.probe.generate import greedy
from rhythm.app.probe.journal import Journal, ProbeError
from rhythm.app.probe.prompts import Prompt
from rhythm.app.probe.summary import summarize
from rhythm.app.probe.text import jaccard
from rhythm.app.probe.trials import (analyse, coupling_counts, eligible_positions, entropy_stats, plan_trials,
                                     trial_seed, waad_peaks)

JOURNAL = "probe_trials.jsonl"
RESULT = "probe.json"
PAGE = "probe.html"


@dataclass(frozen=True)
class ProbeSettings:
    """k: trials of each kind per response. min_after: response tokens an eligible position must have after
    it (:mod:`rhythm.app.probe.trials`). max_new_tokens: response length cap. batch_size: rows per
    generation batch; the prompts go in groups of ``group_size`` (batch_size // (3k + 1), at least 1), so one
    group's 3k + 1 continuations per response fill one batch, and each group's records are written when it
    finishes. seed: the random control's positions and the bootstrap. chat_template: prompts go through the
    tokenizer's chat template as one user message."""

    k: int = 2
    min_after: int = 32
    max_new_tokens: int = 160
    batch_size: int = 32
    seed: int = 0
    chat_template: bool = True

    def __post_init__(self):
        for name in ("k", "min_after", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ProbeError(f"ProbeSettings.{name} must be an int >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))   # numpy integers as plain ints (JSON, range())
        if not is_integer(self.seed):
            raise ProbeError(f"ProbeSettings.seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def group_size(self) -> int:
        return max(1, self.batch_size // (3 * self.k + 1))


def encode(tokenizer, text: str, chat_template: bool) -> list[int]:
    """Prompt token ids: one user message through the chat template (``rhythm.app.common.chat_ids``), or
    plain text with ``chat_template=False``."""
    if chat_template:
        return [int(i) for i in chat_ids(tokenizer, text)[0].tolist()]
    return [int(i) for i in tokenizer(text, add_special_tokens=True).input_ids]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _record(prompt: Prompt, prompt_ids, response_ids, signals, trials, tokenizer, min_after: int) -> dict:
    record = {"id": prompt.id, "prompt": prompt.text, "prompt_tokens": len(prompt_ids),
              "response": _decode(tokenizer, response_ids), "response_ids": response_ids, "skipped": None,
              "trials": trials, "coupling": None, "entropy": None, "heads": None}
    if signals is None:
        record["skipped"] = "empty response"
        return record
    eligible = [bool(v) for v in signals["fai_valid"]]
    peaks = waad_peaks(signals["waad"])
    anchors = [bool(a) for a in signals["anchor"]]
    record.update({
        "signals": {key: signals[key] for key in ("waad", "fai", "fai_valid", "entropy", "preplan", "anchor")},
        "coupling": {"waad_peaks": coupling_counts(peaks, anchors, eligible),
                     "preplan": coupling_counts([bool(p) for p in signals["preplan"]], anchors, eligible)},
        "entropy": entropy_stats(signals["waad"], signals["entropy"], peaks),
        "heads": signals["heads"],
    })
    if trials is None:
        record["skipped"] = (f"{sum(eligible_positions(eligible, min_after))} eligible tokens (valid FAI, at least "
                             f"{min_after} tokens after), fewer than 2 x trials")
    return record


def _group(model, tokenizer, scorer, prompts: list[Prompt], settings: ProbeSettings, bar,
           clock: dict) -> list[dict]:
    """The records of one group of prompts (generation batched across the group); adds the seconds spent to
    ``clock`` ("respond", "analyse", "continue")."""
    t0 = time.perf_counter()
    prompt_ids = [encode(tokenizer, p.text, settings.chat_template) for p in prompts]
    responses = greedy(model, tokenizer, prompt_ids, [settings.max_new_tokens] * len(prompts),
                       batch_size=settings.batch_size)
    t1 = time.perf_counter()
    plans = []
    for prompt, p_ids, r_ids in zip(prompts, prompt_ids, responses):
        signals = analyse(model, tokenizer, scorer, p_ids, r_ids) if r_ids else None
        trials = (plan_trials(signals, r_ids, settings.k, trial_seed(settings.seed, prompt.id), settings.min_after)
                  if signals else None)
        plans.append((signals, trials))
    t2 = time.perf_counter()
    rows, budgets, where = [], [], []
    for i, (_, trials) in enumerate(plans):
        for t in trials or []:
            j = t["position"]
            rows.append(prompt_ids[i] + responses[i][:j] + [t["replacement_id"]])
            budgets.append(len(responses[i]) - j - 1)
            where.append((i, t))
    continuations = greedy(model, tokenizer, rows, budgets, batch_size=settings.batch_size)
    t3 = time.perf_counter()
    for key, seconds in (("respond", t1 - t0), ("analyse", t2 - t1), ("continue", t3 - t2)):
        clock[key] = clock.get(key, 0.0) + seconds
    for (i, t), cont in zip(where, continuations):
        j = t["position"]
        after = responses[i][j + 1:]
        t.update({"original": tokenizer.decode([t["original_id"]]), "replacement": tokenizer.decode([t["replacement_id"]]),
                  "continuation_ids": cont, "continuation": _decode(tokenizer, cont),
                  "original_after": _decode(tokenizer, after),
                  "identical": cont == after})
        t["jaccard"] = jaccard(t["original_after"], t["continuation"])
    records = []
    for prompt, p_ids, r_ids, (signals, trials) in zip(prompts, prompt_ids, responses, plans):
        records.append(_record(prompt, p_ids, r_ids, signals, trials, tokenizer, settings.min_after))
        if bar is not None:
            bar(1)
    return records


def run_probe(model, tokenizer, prompts: list[Prompt], *, settings: ProbeSettings | None = None,
              scorer_settings: dict | None = None, out: str | Path | None = None, meta: dict | None = None,
              progress=None) -> dict:
    """Run the probe on ``prompts`` and return {"settings", "summary", "records", "seconds"} (seconds: wall
    time of this call's generation, analysis and continuations, for the prompts it ran).

    model, tokenizer: a transformers causal LM and its tokenizer (``rhythm.models.load_model``).
    settings: :class:`ProbeSettings`. scorer_settings: ``RhythmScorer`` keys (window, horizon, q, ...).
    out: a folder for the journal, probe.json and probe.html (None: nothing is written, nothing resumed).
    meta: what the page shows about the run (model name, prompt source, ...) and what a resume must match
    (with the settings). progress: callable(n_prompts_done), called as records finish.
    """
    from rhythm.scoring.scorer import RhythmScorer

    settings = settings or ProbeSettings()
    scorer_settings = dict(scorer_settings or {})
    if not prompts:
        raise ProbeError("no prompts to probe")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ProbeError("prompt ids must be unique")
    scorer = RhythmScorer(model, **scorer_settings)
    stored = json.loads(json.dumps({"probe": asdict(settings), "scorer": scorer_settings, **(meta or {})}))
    journal = None
    records: dict = {}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        journal = Journal(out / JOURNAL, {key: v for key, v in stored.items() if key != "source"})
        texts = {p.id: p.text for p in prompts}
        for pid, record in journal.records.items():
            if pid in texts and record["prompt"] != texts[pid]:
                raise ProbeError(f"{out / JOURNAL}: prompt {pid!r} was probed with another text; use another "
                                 "--out, or delete that file")
        records.update(journal.records)
    todo = [p for p in prompts if p.id not in records]
    clock: dict = {}
    if progress is not None and len(prompts) > len(todo):
        progress(len(prompts) - len(todo))
    for first in range(0, len(todo), settings.group_size):
        group = _group(model, tokenizer, scorer, todo[first:first + settings.group_size], settings, progress, clock)
        if journal is not None:
            journal.append(group)
        records.update({r["id"]: r for r in group})
    chosen = [records[i] for i in ids]
    result = {"settings": stored, "summary": summarize(chosen, seed=settings.seed), "records": chosen,
              "seconds": {"prompts_run": len(todo), **{k: round(v, 2) for k, v in clock.items()}}}
    if out is not None:
        from rhythm.app.probe.page import probe_html

        _write(out / RESULT, json.dumps(result, allow_nan=False, indent=1) + "\n")
        _write(out / PAGE, probe_html(result))
    return result


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
