"""The ``rhythm`` command line: the parser, its checks, and the dispatch to the commands.

    rhythm analyze [--model PATH] [--prompt TEXT | --input rollouts.jsonl --id X] [--out reports/]
        chat template -> greedy generation (or an existing rollout and its GRPO group) -> scoring -> terminal
        view + a self-contained HTML report, PNG curves and the numbers as JSON (:mod:`rhythm.app.analyze`).
    rhythm score --input rollouts.jsonl|- --output out.jsonl|out.parquet|- [--model PATH]
        batch scoring of rollouts into per-token signals and gammas; resumable by row id
        (:mod:`rhythm.app.score`, which has the Python API).
    rhythm probe [--model PATH] [--prompts builtin|FILE] [--n N] [--out reports/probe/]
        the paper's tests of the rhythm on the model (docs/probe.md, :mod:`rhythm.app.probe`): JSON of every
        trial and an HTML page.

Every credit / scorer flag (--window, --horizon, --q, ...) comes from :mod:`rhythm.config`. Conventions:
a user error is one line on stderr and exit code 2, found before any model loads; progress bars only on a
terminal (and never with --quiet); messages go to stderr, results to stdout. Models load offline
(HF_HUB_OFFLINE=1): the bundled SmolLM2-135M-Instruct by default.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rhythm import config as knobs
from rhythm.app.common import DEFAULT_STRATEGIES, Console, ModelSource, UsageError, add_threads, apply_threads, \
    check_device, check_writable_dir, positive_int
from rhythm.report.terminal import escape_controls

DTYPES = ("auto", "float32", "bfloat16", "float16")


# ---- flags shared by the commands ---------------------------------------------------------------------------------

def _add_common(p, *, defaults=None):
    p.add_argument("--model", default=None,
                   help="local transformers model dir or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model weights dtype (default: auto = the checkpoint's; float32 for GGUF)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no messages (errors only)")
    add_threads(p)
    knobs.add_arguments(p, knobs.SCORER_KNOBS, defaults=defaults)


def _add_chat_template(p) -> None:
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="text prompts go through the tokenizer's chat template as one user message, as in "
                        "`rhythm analyze` (default: on; use --no-chat-template for already templated prompt text; "
                        "token-id rows are used as given)")


def scorer_knobs(args) -> dict:
    """The checked scorer knob values of the parsed flags (UsageError names the flag); an unset
    ``--temperature`` (analyze: greedy generation) is the knob's default."""
    values = argparse.Namespace(**vars(args))
    if values.temperature is None:
        values.temperature = knobs.default("temperature")
    try:
        return knobs.from_args(values, knobs.SCORER_KNOBS)
    except knobs.ConfigError as e:
        raise UsageError(str(e)) from None


def check_common(args) -> ModelSource:
    """Cheap checks of the shared flags (no file of the model is read yet); the model source to use."""
    source = ModelSource(args.model, Console(args.quiet))
    source.resolve()
    check_device(args.device)
    scorer_knobs(args)
    return source


def _parse_strategies(text: str) -> tuple[str, ...]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in knobs.STRATEGIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of {', '.join(knobs.STRATEGIES)}; "
                                         f"got {text!r}")
    return tuple(dict.fromkeys(names))


# ---- analyze ----------------------------------------------------------------------------------------------------

def _check_stem(name: str) -> None:
    """``--name``: a plain file stem (the report's files go into --out, never elsewhere)."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).name != name:
        raise UsageError(f"--name must be a plain file stem (no folder: the files go to --out), got {name!r}")


def cmd_analyze(args) -> int:
    from rhythm.app import analyze

    source = check_common(args)
    _check_stem(args.name)
    check_writable_dir(Path(args.out), "--out", create=True)
    request = analyze.AnalyzeRequest(
        source=source, device=args.device, dtype=args.dtype, scorer=scorer_knobs(args), prompt=args.prompt,
        input=args.input, id=args.id, chat_template=args.chat_template, max_new_tokens=args.max_new_tokens,
        out=args.out, name=args.name, no_color=args.no_color, sample_temperature=args.temperature,
        min_fai_rows=args.min_fai_rows)
    group_rows, index = analyze.select_rollouts(request)
    source.check(request.scorer["layers"])
    tokenizer, prepared = analyze.prepare(request, group_rows)
    apply_threads(args.threads)
    return analyze.run(request, group_rows, index, tokenizer, prepared, source.console)


# ---- score ------------------------------------------------------------------------------------------------------

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
    check_writable_dir(out.parent if str(out.parent) else Path("."), "--output")
    if out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("--output *.parquet needs pyarrow (pip install pyarrow); or write .jsonl") from None


def score_settings(args):
    """The :class:`rhythm.app.score.ScoreSettings` of parsed ``rhythm score`` flags."""
    from rhythm.app.score import ScoreSettings
    from rhythm.scoring.scorer import ScorerConfig

    return ScoreSettings(model=args.model, device=args.device, dtype=args.dtype, strategies=args.strategies,
                         chat_template=args.chat_template, scorer=ScorerConfig(**scorer_knobs(args)),
                         keep=args.keep)


def _parse_keep(text: str) -> tuple[str, ...] | None:
    """``--keep``: all (every other field of the input row), none, or a comma list of field names."""
    if text.strip() == "all":
        return None
    if text.strip() == "none":
        return ()
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"must be all, none or a comma-separated list of field names; got {text!r}")
    return tuple(dict.fromkeys(names))


RAY_FLAGS = ("workers", "gpus_per_worker", "cpus_per_worker", "block_rows", "max_retries")


def _ray_options(args):
    """The :class:`rhythm.app.distributed.RayOptions` of ``--ray [ADDRESS] --workers ...`` (Ray checked to be
    installed, the paths checked cheaply)."""
    from rhythm.app import distributed

    for flag in ("input", "output"):
        if getattr(args, flag) == "-":
            raise UsageError(f"--{flag} - (a pipe) cannot be used with --ray: give a path every worker can read")
    if args.device is not None:
        raise UsageError("--device cannot be used with --ray: workers run on cuda with --gpus-per-worker, else on "
                         "the CPU")
    out = Path(args.output)
    if out.is_file():
        raise UsageError(f"--output {out} is a file; with --ray the output is a folder of Parquet files")
    if "://" not in args.input and Path(args.input).exists() and out.resolve() == Path(args.input).resolve():
        raise UsageError(f"--output {out} is the input; write the scores to another folder")
    check_writable_dir(out.parent if str(out.parent) else Path("."), "--output", create=True)
    try:
        distributed.require_ray()
    except distributed.RayMissing as e:
        raise UsageError(str(e)) from None
    given = {name: getattr(args, name) for name in RAY_FLAGS if getattr(args, name) is not None}
    return distributed.RayOptions(address=None if args.ray == "local" else args.ray, **given)


def cmd_score(args) -> int:
    from rhythm.app import score_run

    source = check_common(args)
    if args.ray is None:
        given = [name for name in RAY_FLAGS if getattr(args, name) is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --ray (it sets the Ray workers)")
        _check_score_paths(args)
        apply_threads(args.threads)
        return score_run.run(score_settings(args), args.input, args.output, source.console, source)
    from rhythm.app import distributed

    if args.threads is not None:
        raise UsageError("--threads cannot be used with --ray: each worker's torch threads are --cpus-per-worker")
    options = _ray_options(args)
    return distributed.run(score_settings(args), args.input, args.output, options, source.console)


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


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


def _set_help(parser, flag: str, text: str) -> None:
    next(a for a in parser._actions if flag in a.option_strings).help = text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rhythm", description="Attention rhythm (WAAD / FAI) of LLM responses")
    parser.add_argument("--version", action="version", version=f"rhythm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="generate a response and show its preplan-and-anchor rhythm")
    _add_common(a, defaults={"temperature": None})
    _set_help(a, "--temperature", "sample the generation from softmax(logits / T), seeded by --seed (default: "
              "greedy); the entropy baseline reads softmax(logits / T), T = 1 when greedy; with --input, the "
              "temperature the rollouts were sampled at")
    a.add_argument("--prompt", default=None, help="user prompt (default: a grade-school math problem)")
    a.add_argument("--input", default=None, help="analyze an existing rollout from this JSONL file (- = stdin; rows "
                   "as for `rhythm score`, optionally with 'reward', 'advantage', 'group') instead of generating one")
    a.add_argument("--id", default=None, help="id of the rollout in --input; the report adds its GRPO group "
                   "(the rows with the same prompt, or the same 'group')")
    _add_chat_template(a)
    a.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate (default: 200)")
    a.add_argument("--out", default="reports", help="report folder (default: reports/)")
    a.add_argument("--name", default="rhythm", help="report file stem (default: rhythm)")
    a.add_argument("--no-color", action="store_true", help="no ANSI colours in the terminal view")
    a.add_argument("--min-fai-rows", type=positive_int, default=None, metavar="N",
                   help="opt-in: anchor candidates need at least N response rows behind their FAI, |T(s)| "
                        "(default: the paper's definition, any valid FAI)")
    a.set_defaults(func=cmd_analyze)
    s = sub.add_parser("score", help="score rollouts (JSONL) into per-token signals and gammas")
    _add_common(s)
    s.add_argument("--input", required=True,
                   help="JSONL rows (- = stdin): id + prompt/response text or prompt_ids/response_ids")
    s.add_argument("--output", required=True,
                   help="out.jsonl or out.parquet (needs pyarrow), - = JSONL on stdout; reruns resume by id")
    s.add_argument("--strategies", type=_parse_strategies, default=DEFAULT_STRATEGIES,
                   help=f"comma list of gamma strategies from {', '.join(knobs.STRATEGIES)} "
                        "(default: coupled,local,global)")
    s.add_argument("--keep", type=_parse_keep, default=None, metavar="FIELDS",
                   help="the input rows' other fields copied into the output rows (after the computed columns): "
                        "all (default), none, or a comma list such as reward,group")
    _add_chat_template(s)
    r = s.add_argument_group("distributed scoring on Ray Data (needs the [ray] extra; docs/distributed.md)")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="score on a Ray cluster: ADDRESS (auto, ray://host:10001, host:6379) or, without it, a "
                        "local Ray instance; --input: JSONL or Parquet (a file, a folder, a URI pyarrow reads); "
                        "--output: a folder of Parquet files, one per block")
    r.add_argument("--workers", type=positive_int, default=None, help="Ray actors, each holding one model "
                   "(default: 1)")
    r.add_argument("--gpus-per-worker", type=_nonnegative_float, default=None,
                   help="GPUs per worker (default: 0 = CPU); with GPUs the model runs on cuda")
    r.add_argument("--cpus-per-worker", type=_nonnegative_float, default=None,
                   help="CPUs per worker, also its torch threads (default: 1)")
    r.add_argument("--block-rows", type=positive_int, default=None,
                   help="rows per block: one output file, and what is redone when a worker dies (default: 64)")
    r.add_argument("--max-retries", type=_nonnegative_int, default=None,
                   help="times a block is started again after the worker running it died (default: 3); one more "
                        "death and the job stops, naming the block's rows")
    s.set_defaults(func=cmd_score)
    from rhythm.app.probe.command import add_parser as add_probe

    add_probe(sub, _add_common, _add_chat_template, positive_int)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except BrokenPipeError:      # stdout closed early (`rhythm score --output - | head`): exit quietly
        _silence_stdout()
        return 141               # 128 + SIGPIPE, as a process killed by the closed pipe
    except UsageError as e:
        text = str(e)
        print(escape_controls(text if text.startswith("rhythm") else f"rhythm: error: {text}"), file=sys.stderr)
        return 2
    except RuntimeError as e:   # a model the config check could not read, refused by the capture
        from rhythm.capture.architectures import UnsupportedModelError

        if not isinstance(e, UnsupportedModelError):
            raise
        print(escape_controls(f"rhythm: error: {e}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rhythm: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
