"""The ``rhythm`` command line.

    rhythm analyze [--model PATH] [--prompt TEXT | --input rollouts.jsonl --id X] [--out reports/]
        chat template -> greedy generation (or an existing rollout and its GRPO group) -> scoring -> terminal
        view + a self-contained HTML report, PNG curves and the numbers as JSON.
    rhythm score --input rollouts.jsonl|- --output out.jsonl|out.parquet|- [--model PATH]
        batch scoring of rollouts into per-token signals and gammas; resumable by row id.

Every credit / scorer flag (--window, --horizon, --q, ...) comes from :mod:`rhythm.config`. Conventions:
a user error is one line on stderr and exit code 2, found before any model loads; progress bars only on a
terminal (and never with --quiet); messages go to stderr, results to stdout. Models load offline
(HF_HUB_OFFLINE=1): the bundled SmolLM2-135M-Instruct by default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rhythm import config as knobs

DEFAULT_PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May? Think step by step.")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


# ---- shared ---------------------------------------------------------------------------------------------------------

def _info(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _bars(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _progress(args, **kwargs):
    """A tqdm bar on stderr, shown only on a terminal and without --quiet."""
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, disable=not _bars(args), **kwargs)


def _check_model_path(path) -> None:
    from rhythm.models import resolve_model_path

    try:
        resolve_model_path(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None


def _check_device(text: str | None) -> None:
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available here (no GPU, or torch built without CUDA); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {text}: MPS is not available here; use --device cpu")


def _dtype(args):
    import torch

    return None if args.dtype == "auto" else getattr(torch, args.dtype)


def _load(args, tokenizer=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from rhythm.models import load_model

    if not _bars(args):    # transformers' own bars (loading weights) follow the same rule
        hf_logging.disable_progress_bar()
    with _progress(args, total=1, desc="loading model", unit="model", leave=False) as bar:
        model, tokenizer = load_model(args.model, device=args.device, dtype=_dtype(args), tokenizer=tokenizer)
        bar.update(1)
    return model, tokenizer


def _scorer_settings(args) -> dict:
    try:
        return knobs.from_args(args, knobs.SCORER_KNOBS)
    except knobs.ConfigError as e:
        raise UsageError(str(e)) from None


def _scorer(model, args):
    from rhythm.scoring.scorer import RhythmScorer

    return RhythmScorer(model, **_scorer_settings(args))


def _add_common(p):
    p.add_argument("--model", default=None,
                   help="local transformers model dir or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model weights dtype (default: auto = the checkpoint's; float32 for GGUF)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no messages (errors only)")
    knobs.add_arguments(p, knobs.SCORER_KNOBS)


def _check_common(args) -> None:
    """Cheap checks of the shared flags (before any model loads)."""
    _check_model_path(args.model)
    _check_device(args.device)
    _scorer_settings(args)
    _check_architecture(args)


# ---- analyze --------------------------------------------------------------------------------------------------------

def _chat_ids(tokenizer, prompt: str):
    import torch

    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def _generate(model, tokenizer, prompt_ids, max_new_tokens: int, args):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Progress(StoppingCriteria):
        def __init__(self, bar):
            self.bar = bar

        def __call__(self, input_ids, scores, **kwargs):
            self.bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    with _progress(args, total=max_new_tokens, desc="generating", unit="tok", leave=False) as bar, \
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


def _analyze_rollouts(args):
    """(rows of the selected rollout's GRPO group, index of the selected row) from ``--input`` / ``--id``, or
    (None, None) without ``--input``. Checked before any model loads."""
    from rhythm.report.groups import group_of
    from rhythm.app.rows import RowError, read_rows

    if args.input is None:
        if args.id is not None:
            raise UsageError("--id needs --input (the rollouts file to take it from)")
        return None, None
    if args.prompt is not None:
        raise UsageError("--prompt and --input exclude each other: analyze a new generation or an existing rollout")
    src = Path(args.input)
    if not src.is_file():
        raise UsageError(f"--input {src} does not exist or is not a file")
    try:
        rows, _ = read_rows(src.read_bytes(), str(src))
    except RowError as e:
        raise UsageError(str(e)) from None
    if args.id is None:
        if len(rows) != 1:
            raise UsageError(f"--input {src} holds {len(rows)} rollouts: choose one with --id")
        chosen = rows[0]
    else:
        matches = [r for r in rows if str(r.id) == args.id]
        if not matches:
            raise UsageError(f"--id {args.id!r} is not in {src} ({len(rows)} rows)")
        chosen = matches[0]
    group = group_of(rows, chosen)
    return group, next(i for i, r in enumerate(group) if r is chosen)


def _trainer_batch(pairs, pad: int):
    """input_ids, attention_mask, response_mask [B, P + R] in the trainer layout (prompt left-padded, response
    right-padded) for (prompt_ids, response_ids) pairs."""
    import torch

    from rhythm.scoring.scorer import trainer_response_mask

    p_len, r_len = max(len(p) for p, _ in pairs), max(len(r) for _, r in pairs)
    ids = torch.full((len(pairs), p_len + r_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(pairs):
        ids[i, p_len - len(p): p_len] = torch.tensor(p, dtype=torch.long)
        ids[i, p_len: p_len + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, p_len - len(p): p_len + len(r)] = 1
    return ids, mask, trainer_response_mask(mask, r_len)


def _token_strings(tokenizer, ids) -> list[str]:
    return [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(list(ids))]


def cmd_analyze(args) -> int:
    _check_common(args)
    _check_writable_dir(Path(args.out), "--out", create=True)
    group_rows, index = _analyze_rollouts(args)
    from rhythm.report.sequence import SequenceReport, write_report
    from rhythm.report.groups import attach_bands, attach_group
    from rhythm.app.rows import RowError

    t0 = time.time()
    model, tokenizer = _load(args)
    t1 = time.time()
    if group_rows is None:
        prompt = args.prompt or DEFAULT_PROMPT
        prompt_ids = _chat_ids(tokenizer, prompt)
        response_ids = _generate(model, tokenizer, prompt_ids, args.max_new_tokens, args)
        pairs, index = [(prompt_ids[0].tolist(), response_ids[0].tolist())], 0
        source = {"prompt": prompt}
    else:
        try:
            pairs = _tokenize_rows(group_rows, tokenizer, args.chat_template, args.input)
            _check_rows_fit(group_rows, pairs, model.get_input_embeddings().num_embeddings, None, args.input)
        except RowError as e:
            raise UsageError(str(e)) from None
        source = {"input": f"{args.input} (id {group_rows[index].id})"}
    t2 = time.time()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids, mask, response = _trainer_batch(pairs, pad)
    scorer = _scorer(model, args)
    with _progress(args, total=len(pairs), desc="scoring", unit="seq", leave=False) as bar:
        scores = scorer.score(ids, mask, response, with_entropy=True, progress=bar.update)
    _, start, end, _ = scores.segments[index]
    tokens = _token_strings(tokenizer, ids[index, start:end].tolist())
    prompt_ids, response_ids = pairs[index]
    meta = {"title": "Preplan-and-anchor rhythm", "model": args.model or "SmolLM2-135M-Instruct (bundled GGUF)",
            **source, "tokens": f"{len(prompt_ids)} prompt + {len(response_ids)} response",
            "heads per layer": scorer.heads_per_layer,
            "settings": ", ".join(f"{name}={value}" for name, value in _scorer_settings(args).items())}
    report = SequenceReport.from_scores(scores, tokens, index=index, meta=meta)
    attach_bands(report, model, scorer, prompt_ids + response_ids, len(prompt_ids))
    t3 = time.time()
    if group_rows is not None and len(group_rows) > 1:
        note = attach_group(report, group_rows, index, scores, [_token_strings(tokenizer, r) for _, r in pairs])
        if note:
            report.meta["group"] = note
    report.meta["timings"] = f"load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s, score {t3 - t2:.2f}s"
    paths = write_report(report, args.out, stem=args.name)
    colour = not args.no_color and sys.stdout.isatty()
    print(_terminal_view(report, colour))
    print(f"\nreport: {paths['html']}\nplot:   {paths['png']}\n({report.meta['timings']})")
    return 0


# ---- score ---------------------------------------------------------------------------------------------------------

def _check_writable_dir(folder: Path, flag: str, *, create: bool = False) -> None:
    """``folder`` exists (or can be made, with ``create``) and a file can be created in it."""
    import tempfile

    probe = folder
    while create and not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag}: {folder} is not a directory" if probe == folder else
                         f"{flag}: {probe} is not a directory, so {folder} cannot be created")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".rhythm-write-check-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag}: cannot write in {probe} ({e.strerror or e})") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _parse_strategies(text: str) -> tuple[str, ...]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in knobs.STRATEGIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of {', '.join(knobs.STRATEGIES)}; "
                                         f"got {text!r}")
    return tuple(dict.fromkeys(names))


def _check_score_paths(args) -> None:
    if args.input != "-":
        src = Path(args.input)
        if not src.exists():
            raise UsageError(f"--input {src} does not exist")
        if not src.is_file():
            raise UsageError(f"--input {src} is not a file")
    if args.output == "-":
        return
    out = Path(args.output)
    if out.suffix not in (".jsonl", ".parquet"):
        raise UsageError(f"--output must end in .jsonl or .parquet (or be - for stdout), got {out.name}")
    if out.is_dir():
        raise UsageError(f"--output {out} is a directory")
    if args.input != "-" and (out.resolve() == Path(args.input).resolve()
                              or (out.exists() and os.path.samefile(out, args.input))):
        raise UsageError(f"--output {out} is the input file; write the scores to another file")
    _check_writable_dir(out.parent if str(out.parent) else Path("."), "--output")
    if out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("--output *.parquet needs pyarrow (pip install pyarrow); or write .jsonl") from None


def _check_parquet_ids(rows, name: str) -> None:
    """Parquet stores integer ids as int64: refuse any outside it before scoring (not after, at the write)."""
    for row in rows:
        if isinstance(row.id, int) and not -(1 << 63) <= row.id < (1 << 63):
            raise UsageError(f"{name}:{row.line}: id {row.id} does not fit Parquet's int64 ids; "
                             "use string ids or write .jsonl")


def _model_id(path) -> str:
    from rhythm.models import resolve_model_path

    folder, kwargs = resolve_model_path(path)
    return str(((folder / kwargs["gguf_file"]) if "gguf_file" in kwargs else folder).resolve())


def _score_settings(args, id_kind: str) -> dict:
    """Everything that changes a number of the output (stored with it; a resume must match)."""
    settings = {"model": _model_id(args.model), "dtype": args.dtype, "ids": id_kind,
                "strategies": list(args.strategies), "chat_template": args.chat_template}
    settings.update(_scorer_settings(args))
    if settings["grouping"] != "fixed":   # per-sequence groups do not depend on how rows are batched
        del settings["micro_batch_size"]
    return json.loads(json.dumps(settings))    # tuples -> lists, as stored


def _tokenize_rows(rows, tokenizer, use_template: bool, name: str):
    """[(prompt_ids, response_ids)] per row: token rows as given; text rows with the prompt as one user message
    through the chat template (as ``rhythm analyze`` does) when the tokenizer has one and use_template."""
    from rhythm.app.rows import RowError

    template = use_template and bool(getattr(tokenizer, "chat_template", None))
    pairs = []
    for row in rows:
        if not row.is_text:
            pairs.append((row.prompt_ids, row.response_ids))
            continue
        if template:
            prompt = _chat_ids(tokenizer, row.prompt)[0].tolist()
        else:
            prompt = tokenizer(row.prompt, add_special_tokens=True).input_ids
        response = tokenizer(row.response, add_special_tokens=False).input_ids
        if not prompt and not response:
            raise RowError(f"{name}:{row.line}: prompt and response tokenize to no tokens (nothing to score)")
        pairs.append((list(prompt), list(response)))
    return pairs


def _model_config(args):
    """The model's transformers config, read without loading the weights (None where it cannot be read
    cheaply: the same checks then run on the loaded model). Read once per command (kept on ``args``: the
    architecture check and the row-length check both use it; for a GGUF file it parses the file's metadata)."""
    if not hasattr(args, "_model_config"):
        from rhythm.models import resolve_model_path

        try:
            from transformers import AutoConfig

            folder, kwargs = resolve_model_path(args.model)
            args._model_config = AutoConfig.from_pretrained(str(folder), local_files_only=True, **kwargs)
        except Exception:   # an unusual checkpoint
            args._model_config = None
    return args._model_config


def _check_architecture(args) -> None:
    """Refuse a model type the capture was not taught about from its config, before the weights load or a
    token is generated (the capture refuses it again on the loaded model)."""
    from rhythm.capture.architectures import UnsupportedModelError, check_config_types

    cfg = _model_config(args)
    if cfg is None:
        return
    subs = [getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", {})]
    try:
        check_config_types([cfg] + [c for c in subs if hasattr(c, "model_type")],
                           f"checkpoint {args.model or 'bundled SmolLM2'}")
    except UnsupportedModelError as e:
        raise UsageError(str(e)) from None


def _model_limits(args):
    """(vocab_size, max_position_embeddings) from the model's config without loading the weights (None where
    the config does not say or cannot be read cheaply)."""
    cfg = _model_config(args)
    if cfg is None:
        return None, None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "vocab_size", None), getattr(cfg, "max_position_embeddings", None)


def _check_rows_fit(rows, pairs, vocab_size, max_positions, name: str) -> None:
    from rhythm.app.rows import RowError, check_vocab

    if vocab_size:
        check_vocab([r for r in rows if not r.is_text], int(vocab_size), name)
    if max_positions:
        for row, (p, r) in zip(rows, pairs):
            if len(p) + len(r) > max_positions:
                raise RowError(f"{name}:{row.line}: {len(p)} prompt + {len(r)} response tokens exceed the model's "
                               f"max_position_embeddings = {max_positions}")


def row_seed(seed: int, row_id) -> int:
    """The random baseline's seed for one row: sha256 of (seed, the row's id), 63 bits.

    Each row draws from its own generator, so its gamma_random depends only on the seed and its id, never on
    which micro-batch or resume point it was scored in (ids are unique and of one kind per input)."""
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}\0{type(row_id).__name__}\0{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _random_gamma(config, chunk, pairs, width: int):
    """gamma of the ``random`` strategy per row: float32 [len(chunk), width] in the response layout, 1 on
    padding. Each row is drawn as if scored alone (its own [1, P + R] layout, the response a suffix) with seed
    ``row_seed(seed, id)``: exactly ``RhythmScorer.score`` on that row alone with that seed."""
    import torch

    from rhythm.credit.shaping import credit_multipliers

    gamma = torch.ones(len(chunk), width, dtype=torch.float32)
    for i, (row, (p, r)) in enumerate(zip(chunk, pairs)):
        if r:
            response = torch.zeros(1, len(p) + len(r), dtype=torch.bool)
            response[0, len(p):] = True
            zeros = torch.zeros(response.shape)
            gamma[i, :len(r)] = credit_multipliers(zeros, zeros, response, strategy="random", q=config.q,
                                                   gamma_amp=config.gamma_amp,
                                                   seed=row_seed(config.seed, row.id))[0, len(p):]
    return gamma


def _score_batch(scorer, chunk, pairs, pad: int, strategies) -> list[dict]:
    """Score one micro-batch in the trainer layout (prompt left-padded, response right-padded) -> output rows."""
    from rhythm.scoring.scorer import to_response_tensor

    ids, mask, response = _trainer_batch(pairs, pad)
    r_len = max(len(r) for _, r in pairs)
    scores = scorer.score(ids, mask, response, with_entropy="entropy" in strategies)
    columns = {"waad": scores.waad, "fai": scores.fai, "fai_valid": scores.fai_valid}
    columns.update({f"gamma_{s}": scores.gamma(s) for s in strategies if s != "random"})
    columns = {key: to_response_tensor(x, r_len, response) for key, x in columns.items()}
    if "random" in strategies:
        columns["gamma_random"] = _random_gamma(scorer.config, chunk, pairs, r_len)
    out = []
    for i, (row, (p, r)) in enumerate(zip(chunk, pairs)):
        item = {"id": row.id, "prompt_length": len(p), "response_ids": list(r)}
        item.update({key: x[i, : len(r)].tolist() for key, x in columns.items()})
        out.append(item)
    return out


def cmd_score(args) -> int:
    from rhythm.app.output import OutputError, Sink
    from rhythm.app.rows import RowError, read_rows

    _check_common(args)
    _check_score_paths(args)
    name = "<stdin>" if args.input == "-" else args.input
    data = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
    try:
        rows, id_kind = read_rows(data, name)
        if args.output.endswith(".parquet"):
            _check_parquet_ids(rows, name)
        sink = Sink(args.output, _score_settings(args, id_kind))
    except (RowError, OutputError) as e:
        raise UsageError(str(e)) from None
    todo = [row for row in rows if row.id not in sink.done]
    if not todo:
        _info(args, f"nothing to do: all {len(rows)} rows of {name} are in {args.output}")
        sink.finish()
        return 0
    from rhythm.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)   # cheap: the rows are checked against it before the weights load
    try:
        pairs = _tokenize_rows(todo, tokenizer, args.chat_template, name)
        _check_rows_fit(todo, pairs, *_model_limits(args), name)
    except RowError as e:
        raise UsageError(str(e)) from None
    model, tokenizer = _load(args, tokenizer)
    try:   # the loaded model is the final word on the vocabulary (embedding rows)
        _check_rows_fit(todo, pairs, model.get_input_embeddings().num_embeddings, None, name)
    except RowError as e:
        raise UsageError(str(e)) from None
    scorer = _scorer(model, args)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    size = scorer.config.micro_batch_size
    written = 0
    try:
        with _progress(args, total=len(rows), initial=len(rows) - len(todo), desc="scoring", unit="row") as bar:
            for first in range(0, len(todo), size):
                chunk = todo[first:first + size]
                sink.append(_score_batch(scorer, chunk, pairs[first:first + size], pad, args.strategies))
                written += len(chunk)
                bar.update(len(chunk))
    except KeyboardInterrupt:
        _info(args, f"interrupted: {written} new rows written to {args.output}; run the same command to resume")
        return 130
    sink.finish()
    _info(args, f"wrote {written} rows to {args.output}" + (f" ({len(rows) - len(todo)} already there)"
                                                            if len(rows) > len(todo) else ""))
    return 0


# ---- entry point ----------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``rhythm score: error: ...``, exit code 2."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("attention-rhythm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_chat_template(p) -> None:
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="text prompts go through the tokenizer's chat template as one user message, as in "
                        "`rhythm analyze` (default: on; use --no-chat-template for already templated prompt text; "
                        "token-id rows are used as given)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rhythm", description="Attention rhythm (WAAD / FAI) of LLM responses")
    parser.add_argument("--version", action="version", version=f"rhythm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="generate a response and show its preplan-and-anchor rhythm")
    _add_common(a)
    a.add_argument("--prompt", default=None, help="user prompt (default: a grade-school math problem)")
    a.add_argument("--input", default=None, help="analyze an existing rollout from this JSONL file (rows as for "
                   "`rhythm score`, optionally with 'reward', 'advantage', 'group') instead of generating one")
    a.add_argument("--id", default=None, help="id of the rollout in --input; the report adds its GRPO group "
                   "(the rows with the same prompt, or the same 'group')")
    _add_chat_template(a)
    a.add_argument("--max-new-tokens", type=_positive_int, default=200, help="tokens to generate (default: 200)")
    a.add_argument("--out", default="reports", help="report folder (default: reports/)")
    a.add_argument("--name", default="rhythm", help="report file stem (default: rhythm)")
    a.add_argument("--no-color", action="store_true", help="no ANSI colours in the terminal view")
    a.set_defaults(func=cmd_analyze)
    s = sub.add_parser("score", help="score rollouts (JSONL) into per-token signals and gammas")
    _add_common(s)
    s.add_argument("--input", required=True,
                   help="JSONL rows (- = stdin): id + prompt/response text or prompt_ids/response_ids")
    s.add_argument("--output", required=True,
                   help="out.jsonl or out.parquet (needs pyarrow), - = JSONL on stdout; reruns resume by id")
    s.add_argument("--strategies", type=_parse_strategies, default=("coupled", "local", "global"),
                   help=f"comma list of gamma strategies from {', '.join(knobs.STRATEGIES)} "
                        "(default: coupled,local,global)")
    _add_chat_template(s)
    s.set_defaults(func=cmd_score)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as e:
        text = str(e)
        print(text if text.startswith("rhythm") else f"rhythm: error: {text}", file=sys.stderr)
        return 2
    except RuntimeError as e:   # a model the config check could not read, refused by the capture
        from rhythm.capture.architectures import UnsupportedModelError

        if not isinstance(e, UnsupportedModelError):
            raise
        print(f"rhythm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rhythm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
