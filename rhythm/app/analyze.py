"""``rhythm analyze``: chat template -> greedy generation (or an existing rollout and its GRPO group) ->
scoring -> terminal view + a self-contained HTML report, PNG curves and the numbers as JSON."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rhythm.app.common import Console, ModelSource, UsageError, chat_ids, pad_id, trainer_batch

DEFAULT_PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May? Think step by step.")


@dataclass(frozen=True)
class AnalyzeRequest:
    """What ``rhythm analyze`` was asked (checked by the parser)."""

    source: ModelSource
    device: str | None
    dtype: str
    scorer: dict                 # the scorer's knob values (RhythmScorer keyword arguments)
    prompt: str | None
    input: str | None
    id: str | None
    chat_template: bool
    max_new_tokens: int
    out: str
    name: str
    no_color: bool


def _generate(model, tokenizer, prompt_ids, max_new_tokens: int, console: Console):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Progress(StoppingCriteria):
        def __init__(self, bar):
            self.bar = bar

        def __call__(self, input_ids, scores, **kwargs):
            self.bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    with console.progress(total=max_new_tokens, desc="generating", unit="tok", leave=False) as bar, \
            torch.inference_mode():
        out = model.generate(prompt_ids.to(device), attention_mask=torch.ones_like(prompt_ids).to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([_Progress(bar)]),
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    return out[:, prompt_ids.shape[1]:].cpu()


def _terminal_view(report, colour: bool) -> str:
    def paint(text, code):
        return f"\033[{code}m{text}\033[0m" if colour else text

    pieces = []
    for t in range(report.response_start, len(report.tokens)):
        tok = report.tokens[t]
        if report.anchor[t]:
            tok = paint("{" + tok + "}", "1;32")
        elif report.preplan[t]:
            tok = paint("[" + tok + "]", "36")
        pieces.append(tok)
    lines = ["".join(pieces), "",
             f"legend: {paint('[preplan]', '36')} = top-q |ΔWAAD| (local chunk starts), "
             f"{paint('{anchor}', '1;32')} = top-q FAI (tokens later tokens attend to)", "", "strongest anchors:"]
    for i, tok, fai in report.strongest_anchors(10):
        lines.append(f"  #{i:<4d} {tok!r:<20} FAI {fai:.4f}")
    return "\n".join(lines)


def select_rollouts(request: AnalyzeRequest):
    """(rows of the selected rollout's GRPO group, index of the selected row) from ``--input`` / ``--id``, or
    (None, None) without ``--input``. Checked before any model loads."""
    from rhythm.app.rows import RowError, read_rows
    from rhythm.report.groups import group_of

    if request.input is None:
        if request.id is not None:
            raise UsageError("--id needs --input (the rollouts file to take it from)")
        return None, None
    if request.prompt is not None:
        raise UsageError("--prompt and --input exclude each other: analyze a new generation or an existing rollout")
    src = Path(request.input)
    if not src.is_file():
        raise UsageError(f"--input {src} does not exist or is not a file")
    try:
        rows, _ = read_rows(src.read_bytes(), str(src))
    except RowError as e:
        raise UsageError(str(e)) from None
    if request.id is None:
        if len(rows) != 1:
            raise UsageError(f"--input {src} holds {len(rows)} rollouts: choose one with --id")
        chosen = rows[0]
    else:
        matches = [r for r in rows if str(r.id) == request.id]
        if not matches:
            raise UsageError(f"--id {request.id!r} is not in {src} ({len(rows)} rows)")
        chosen = matches[0]
    group = group_of(rows, chosen)
    return group, next(i for i, r in enumerate(group) if r is chosen)


def _token_strings(tokenizer, ids) -> list[str]:
    return [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(list(ids))]


def run(request: AnalyzeRequest, group_rows, index, console: Console) -> int:
    """Load, generate or tokenize, score, and write the report (the checks ran before)."""
    from rhythm.app.rows import RowError
    from rhythm.app.score import check_rows_fit, tokenize_rows
    from rhythm.report.groups import attach_bands, attach_group
    from rhythm.report.sequence import SequenceReport, write_report
    from rhythm.scoring.scorer import RhythmScorer

    t0 = time.time()
    model, tokenizer = request.source.load(device=request.device, dtype=request.dtype, console=console)
    t1 = time.time()
    if group_rows is None:
        prompt = request.prompt or DEFAULT_PROMPT
        prompt_ids = chat_ids(tokenizer, prompt)
        response_ids = _generate(model, tokenizer, prompt_ids, request.max_new_tokens, console)
        pairs, index = [(prompt_ids[0].tolist(), response_ids[0].tolist())], 0
        source = {"prompt": prompt}
    else:
        try:
            pairs = tokenize_rows(group_rows, tokenizer, request.chat_template, request.input)
            check_rows_fit(group_rows, pairs, model.get_input_embeddings().num_embeddings, None, request.input)
        except RowError as e:
            raise UsageError(str(e)) from None
        source = {"input": f"{request.input} (id {group_rows[index].id})"}
    t2 = time.time()
    ids, mask, response = trainer_batch(pairs, pad_id(tokenizer))
    scorer = RhythmScorer(model, **request.scorer)
    with console.progress(total=len(pairs), desc="scoring", unit="seq", leave=False) as bar:
        scores = scorer.score(ids, mask, response, with_entropy=True, progress=bar.update)
    span = scores.segments.spans[index]
    tokens = _token_strings(tokenizer, ids[index, span.start:span.end].tolist())
    prompt_ids, response_ids = pairs[index]
    meta = {"title": "Preplan-and-anchor rhythm", "model": request.source.path or "SmolLM2-135M-Instruct (bundled GGUF)",
            **source, "tokens": f"{len(prompt_ids)} prompt + {len(response_ids)} response",
            "heads per layer": scorer.heads_per_layer,
            "settings": ", ".join(f"{name}={value}" for name, value in request.scorer.items())}
    report = SequenceReport.from_scores(scores, tokens, index=index, meta=meta)
    attach_bands(report, model, scorer, prompt_ids + response_ids, len(prompt_ids))
    t3 = time.time()
    if group_rows is not None and len(group_rows) > 1:
        note = attach_group(report, group_rows, index, scores, [_token_strings(tokenizer, r) for _, r in pairs])
        if note:
            report.meta["group"] = note
    report.meta["timings"] = f"load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s, score {t3 - t2:.2f}s"
    paths = write_report(report, request.out, stem=request.name)
    colour = not request.no_color and sys.stdout.isatty()
    print(_terminal_view(report, colour))
    print(f"\nreport: {paths['html']}\nplot:   {paths['png']}\n({report.meta['timings']})")
    return 0
