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
    """What ``rhythm analyze`` was asked (checked by the parser). ``sample_temperature``: None = greedy
    generation, else sampling from softmax(logits / T) seeded by the scorer's seed."""

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
    sample_temperature: float | None = None
    min_fai_rows: int | None = None   # opt-in minimum |T(s)| of anchor candidates (None: the paper's definition)


def _generate(model, tokenizer, prompt_ids, request: AnalyzeRequest, console: Console):
    """The response ids [1, R]: greedy, or sampled from softmax(logits / T) (no top-k / top-p filtering: the
    distribution the entropy baseline reads) with torch seeded by the scorer's seed."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Progress(StoppingCriteria):
        def __init__(self, bar):
            self.bar = bar

        def __call__(self, input_ids, scores, **kwargs):
            self.bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    sampling = {"do_sample": False}
    if request.sample_temperature is not None:
        torch.manual_seed(request.scorer["seed"])
        sampling = {"do_sample": True, "temperature": request.sample_temperature, "top_k": 0, "top_p": 1.0}
    with console.progress(total=request.max_new_tokens, desc="generating", unit="tok", leave=False) as bar, \
            torch.inference_mode():
        out = model.generate(prompt_ids.to(device), attention_mask=torch.ones_like(prompt_ids).to(device),
                             max_new_tokens=request.max_new_tokens, **sampling,
                             stopping_criteria=StoppingCriteriaList([_Progress(bar)]),
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    return out[:, prompt_ids.shape[1]:].cpu()


def select_rollouts(request: AnalyzeRequest):
    """(rows of the selected rollout's GRPO group, index of the selected row) from ``--input`` (a file, or -
    for stdin) / ``--id``, or (None, None) without ``--input``. Checked before any model loads."""
    from rhythm.app.rows import RowError, read_rows
    from rhythm.report.groups import group_of

    if request.input is None:
        if request.id is not None:
            raise UsageError("--id needs --input (the rollouts file to take it from)")
        return None, None
    if request.prompt is not None:
        raise UsageError("--prompt and --input exclude each other: analyze a new generation or an existing rollout")
    name = "<stdin>" if request.input == "-" else request.input
    if request.input == "-":
        data = sys.stdin.buffer.read()
    else:
        src = Path(request.input)
        if not src.is_file():
            raise UsageError(f"--input {src} does not exist or is not a file")
        data = src.read_bytes()
    try:
        rows, _ = read_rows(data, name)
    except RowError as e:
        raise UsageError(str(e)) from None
    if request.id is None:
        if len(rows) != 1:
            raise UsageError(f"--input {name} holds {len(rows)} rollouts: choose one with --id")
        chosen = rows[0]
    else:
        matches = [r for r in rows if str(r.id) == request.id]
        if not matches:
            raise UsageError(f"--id {request.id!r} is not in {name} ({len(rows)} rows)")
        chosen = matches[0]
    group = group_of(rows, chosen)
    return group, next(i for i, r in enumerate(group) if r is chosen)


def prepare(request: AnalyzeRequest, group_rows):
    """The tokenizer and the rows' (prompt_ids, response_ids), checked against the model's config (vocabulary,
    positions; for a generation the prompt plus --max-new-tokens) before the weights load."""
    from rhythm.app.rows import RowError
    from rhythm.app.score import check_rows_fit, tokenize_rows

    source = request.source
    tokenizer = source.load_tokenizer()
    vocab, positions = source.limits()
    if group_rows is None:
        prompt_ids = chat_ids(tokenizer, request.prompt or DEFAULT_PROMPT)
        if positions and prompt_ids.shape[1] + request.max_new_tokens > positions:
            raise UsageError(f"--max-new-tokens {request.max_new_tokens}: the prompt's {prompt_ids.shape[1]} tokens "
                             f"plus {request.max_new_tokens} new ones exceed the model's max_position_embeddings = "
                             f"{positions}")
        return tokenizer, prompt_ids
    name = "<stdin>" if request.input == "-" else request.input
    try:
        pairs = tokenize_rows(group_rows, tokenizer, request.chat_template, name)
        check_rows_fit(group_rows, pairs, vocab, positions, name)
    except RowError as e:
        raise UsageError(str(e)) from None
    return tokenizer, pairs


def _token_strings(tokenizer, ids) -> list[str]:
    return [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(list(ids))]


def run(request: AnalyzeRequest, group_rows, index, tokenizer, prepared, console: Console) -> int:
    """Load, generate (or take the prepared rows), score, and write the report (the checks ran before).
    ``prepared``: the prompt ids [1, P] of a generation, or the group's (prompt_ids, response_ids)."""
    from rhythm.app.rows import RowError, check_vocab
    from rhythm.report.groups import attach_bands, attach_group
    from rhythm.report.sequence import SequenceReport, write_report
    from rhythm.report.terminal import escape_controls, terminal_view
    from rhythm.scoring.scorer import RhythmScorer

    t0 = time.time()
    model, tokenizer = request.source.load(device=request.device, dtype=request.dtype, tokenizer=tokenizer)
    t1 = time.time()
    if group_rows is None:
        prompt = request.prompt or DEFAULT_PROMPT
        response_ids = _generate(model, tokenizer, prepared, request, console)
        pairs, index = [(prepared[0].tolist(), response_ids[0].tolist())], 0
        source = {"prompt": prompt}
        if request.sample_temperature is not None:
            source["sampling"] = f"temperature {request.sample_temperature}, seed {request.scorer['seed']}"
    else:
        pairs = prepared
        try:    # the loaded model is the final word on the vocabulary (its embedding rows)
            check_vocab([r for r in group_rows if not r.is_text], model.get_input_embeddings().num_embeddings,
                        "<stdin>" if request.input == "-" else request.input)
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
    model_name = request.source.path or "SmolLM2-135M-Instruct (bundled GGUF)"
    meta = {"title": "Preplan-and-anchor rhythm", "model": model_name,
            **source, "tokens": f"{len(prompt_ids)} prompt + {len(response_ids)} response",
            "heads per layer": scorer.heads_per_layer,
            "settings": ", ".join(f"{name}={value}" for name, value in request.scorer.items())}
    report = SequenceReport.from_scores(scores, tokens, index=index, meta=meta, min_fai_rows=request.min_fai_rows)
    attach_bands(report, model, scorer, prompt_ids + response_ids, len(prompt_ids))
    t3 = time.time()
    if group_rows is not None and len(group_rows) > 1:
        note = attach_group(report, group_rows, index, scores, [_token_strings(tokenizer, r) for _, r in pairs])
        if note:
            report.meta["group"] = note
    report.meta["timings"] = f"load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s, score {t3 - t2:.2f}s"
    paths = write_report(report, request.out, stem=request.name)
    colour = not request.no_color and sys.stdout.isatty()
    print(terminal_view(report, colour))
    print(escape_controls(f"\nreport: {paths['html']}\nplot:   {paths['png']}\n({report.meta['timings']})"))
    return 0
