"""The ``rhythm`` command line.

    rhythm analyze [--model PATH] [--prompt TEXT] [--max-new-tokens 200] [--out reports/]
        chat template -> greedy generation -> scoring -> terminal view + HTML/PNG/JSON report.
    rhythm score --input rollouts.jsonl --output out.jsonl|out.parquet [--model PATH]
        batch scoring of rollouts into per-token signals and gammas; resumable by row id.

Models load offline (HF_HUB_OFFLINE=1): the bundled SmolLM2-135M-Instruct by default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May? Think step by step.")
STRATEGIES = ("coupled", "local", "global", "random", "entropy")


# ---- shared ---------------------------------------------------------------------------------------------------------

def _load(path, device):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm.auto import tqdm

    from .models import load_model

    with tqdm(total=1, desc="loading model", unit="model", leave=False) as bar:
        model, tokenizer = load_model(path, device=device)
        bar.update(1)
    return model, tokenizer


def _scorer(model, args):
    from .scorer import RhythmScorer

    return RhythmScorer(model, micro_batch_size=args.micro_batch_size, window=args.window,
                        horizon=(args.h_lo, None if args.h_hi < 0 else args.h_hi), q=args.q)


def _add_common(p):
    p.add_argument("--model", default=None, help="local transformers model dir or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: CPU)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=10, help="W of WAAD")
    p.add_argument("--h-lo", type=int, default=10, help="FAI horizon start")
    p.add_argument("--h-hi", type=int, default=100, help="FAI horizon end (-1 = to the end of the sequence)")
    p.add_argument("--q", type=float, default=0.4, help="selected fraction of response tokens")


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


def _generate(model, tokenizer, prompt_ids, max_new_tokens: int):
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Progress(StoppingCriteria):
        def __init__(self, bar):
            self.bar = bar

        def __call__(self, input_ids, scores, **kwargs):
            self.bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    with tqdm(total=max_new_tokens, desc="generating", unit="tok", leave=False) as bar, torch.inference_mode():
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


def cmd_analyze(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .report import SequenceReport, write_report

    t0 = time.time()
    model, tokenizer = _load(args.model, args.device)
    prompt = args.prompt or DEFAULT_PROMPT
    prompt_ids = _chat_ids(tokenizer, prompt)
    t1 = time.time()
    response_ids = _generate(model, tokenizer, prompt_ids, args.max_new_tokens)
    t2 = time.time()
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, prompt_ids.shape[1]:] = True
    scorer = _scorer(model, args)
    with tqdm(total=1, desc="scoring", unit="seq", leave=False) as bar:
        scores = scorer.score(ids, None, response, with_entropy=True, progress=bar.update)
    t3 = time.time()
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    tokens = [tokenizer.convert_tokens_to_string([t]) for t in tokens]
    meta = {"title": "Preplan-and-anchor rhythm", "model": args.model or "SmolLM2-135M-Instruct (bundled GGUF)",
            "prompt": prompt, "tokens": f"{prompt_ids.shape[1]} prompt + {response_ids.shape[1]} response",
            "heads per layer": scorer.heads_per_layer,
            "timings": f"load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s, score {t3 - t2:.2f}s",
            "settings": f"W={args.window}, horizon=({args.h_lo}, {args.h_hi}), q={args.q}"}
    report = SequenceReport.from_scores(scores, tokens, meta=meta)
    paths = write_report(report, args.out, stem=args.name)
    colour = not args.no_color and sys.stdout.isatty()
    print(_terminal_view(report, colour))
    print(f"\nreport: {paths['html']}\nplot:   {paths['png']}\n({meta['timings']})")
    return 0


# ---- score ---------------------------------------------------------------------------------------------------------

def _read_rows(path: Path):
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n + 1}: not valid JSON ({e})")
            row.setdefault("id", str(n))
            yield row


def _row_tokens(row, tokenizer):
    """(prompt_ids, response_ids) from prompt/response text or prompt_ids/response_ids."""
    if "prompt_ids" in row and "response_ids" in row:
        return list(row["prompt_ids"]), list(row["response_ids"])
    if "prompt" in row and "response" in row:
        prompt = tokenizer(row["prompt"], add_special_tokens=True).input_ids
        response = tokenizer(row["response"], add_special_tokens=False).input_ids
        return list(prompt), list(response)
    raise SystemExit(f"row {row.get('id')!r}: needs 'prompt' and 'response' (text) or 'prompt_ids' and "
                     "'response_ids' (token ids)")


class _Sink:
    """Appends finished rows; .jsonl directly (flush per micro-batch), .parquet via a sidecar JSONL that is
    converted when the run completes (so an interrupted run loses no finished row either way)."""

    def __init__(self, output: Path):
        self.output = output
        self.parquet = output.suffix == ".parquet"
        if self.parquet:
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise SystemExit("--output *.parquet needs pyarrow (pip install pyarrow); or write .jsonl")
        self.journal = output.with_name(output.name + ".partial.jsonl") if self.parquet else output

    def done_ids(self) -> set[str]:
        ids = set()
        if self.parquet and self.output.exists():
            import pyarrow.parquet as pq

            ids |= {str(x) for x in pq.read_table(self.output, columns=["id"]).column("id").to_pylist()}
        if self.journal.exists():
            with self.journal.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        ids.add(str(json.loads(line)["id"]))
                    except (json.JSONDecodeError, KeyError):
                        pass  # a torn last line from an interrupted run: that row is redone
        return ids

    def append(self, rows) -> None:
        if self.journal.exists() and self.journal.stat().st_size:
            with self.journal.open("rb+") as f:  # drop a torn last line left by an interrupted run
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    data = self.journal.read_bytes()
                    f.seek(0)
                    f.truncate(data.rfind(b"\n") + 1)
        with self.journal.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        if not self.parquet or not self.journal.exists():
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = []
        if self.output.exists():
            rows += pq.read_table(self.output).to_pylist()
        with self.journal.open(encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
        tmp = self.output.with_name(self.output.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(self.output)
        self.journal.unlink()


def cmd_score(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .scorer import to_response_tensor, trainer_response_mask

    src, output = Path(args.input), Path(args.output)
    if not src.exists():
        raise SystemExit(f"--input {src} does not exist")
    if output.suffix not in (".jsonl", ".parquet"):
        raise SystemExit(f"--output must end in .jsonl or .parquet, got {output.name}")
    sink = _Sink(output)
    done = sink.done_ids()
    rows = [r for r in _read_rows(src) if str(r["id"]) not in done]
    if not rows:
        print(f"nothing to do: all rows of {src} are in {output}")
        sink.finish()
        return 0
    model, tokenizer = _load(args.model, args.device)
    scorer = _scorer(model, args)
    strategies = [s for s in args.strategies.split(",") if s]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    size = args.micro_batch_size
    with tqdm(total=len(rows) + len(done), initial=len(done), desc="scoring", unit="row") as bar:
        for first in range(0, len(rows), size):
            chunk = rows[first:first + size]
            pairs = [_row_tokens(r, tokenizer) for r in chunk]
            p_len = max(len(p) for p, _ in pairs)
            r_len = max(len(r) for _, r in pairs)
            ids = torch.full((len(chunk), p_len + r_len), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, r) in enumerate(pairs):   # trainer layout: prompt left-padded, response right-padded
                ids[i, p_len - len(p): p_len] = torch.tensor(p, dtype=torch.long)
                ids[i, p_len: p_len + len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, p_len - len(p): p_len + len(r)] = 1
            response = trainer_response_mask(mask, r_len)
            scores = scorer.score(ids, mask, response, with_entropy="entropy" in strategies)
            gammas = {s: to_response_tensor(scores.gamma(s), r_len, response) for s in strategies}
            out = []
            for i, (row, (p, r)) in enumerate(zip(chunk, pairs)):
                n = len(r)
                resp = lambda x: to_response_tensor(x, r_len, response)[i, :n].tolist()  # noqa: E731
                item = {"id": row["id"], "prompt_length": len(p), "response_ids": r,
                        "waad": resp(scores.waad), "fai": resp(scores.fai), "fai_valid": resp(scores.fai_valid)}
                for s in strategies:
                    item[f"gamma_{s}"] = gammas[s][i, :n].tolist()
                out.append(item)
            sink.append(out)
            bar.update(len(chunk))
    sink.finish()
    print(f"wrote {output}")
    return 0


# ---- entry point ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rhythm", description="Attention rhythm (WAAD / FAI) of LLM responses")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="generate a response and show its preplan-and-anchor rhythm")
    _add_common(a)
    a.add_argument("--prompt", default=None, help="user prompt (default: a grade-school math problem)")
    a.add_argument("--max-new-tokens", type=int, default=200)
    a.add_argument("--out", default="reports", help="report folder (default: reports/)")
    a.add_argument("--name", default="rhythm", help="report file stem")
    a.add_argument("--no-color", action="store_true", help="no ANSI colours in the terminal view")
    a.set_defaults(func=cmd_analyze)
    s = sub.add_parser("score", help="score rollouts (JSONL) into per-token signals and gammas")
    _add_common(s)
    s.add_argument("--input", required=True, help="JSONL rows: id + prompt/response text or prompt_ids/response_ids")
    s.add_argument("--output", required=True, help="out.jsonl or out.parquet (needs pyarrow); reruns resume by id")
    s.add_argument("--strategies", default="coupled,local,global", help="comma list of gamma strategies")
    s.set_defaults(func=cmd_score)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
