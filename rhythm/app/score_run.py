"""The single-process ``rhythm score`` command around :class:`rhythm.app.score.ScoreJob`.

The output is locked for the whole run (a second run on it fails at once). The input is streamed, never held
whole, in three passes: (1) every row alone and the ids across rows, then the stored settings and the ids
already written; (2) the rows still to score against the model's config and tokenizer; the weights load only
after both; (3) scoring, micro-batch by micro-batch, each appended and fsynced before the next. Standard input
is copied to a temporary file on the first pass; a file that changes between passes is refused.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from rhythm.app.common import Console, ModelSource, UsageError
from rhythm.app.output import OutputError, Sink
from rhythm.app.rows import InputRow, RowChecker, RowError, iter_rows
from rhythm.app.score import KeptFields, ScoreJob, ScoreSettings, check_parquet_ids

TOKENIZE_CHUNK = 256        # rows tokenized at a time in the checking pass


class InputFile:
    """A JSONL input read in several passes: a file (refused when it changes between passes) or standard
    input (``-``: copied to a temporary file while the first pass reads it)."""

    def __init__(self, input: str):
        self.name = "<stdin>" if input == "-" else input
        self.path = None if input == "-" else Path(input)
        self._spool = None
        self._stamp = None

    @contextlib.contextmanager
    def lines(self) -> Iterator[Iterable[bytes]]:
        """The raw lines, from the start."""
        if self.path is None:
            if self._spool is None:
                self._spool = tempfile.TemporaryFile()
                shutil.copyfileobj(sys.stdin.buffer, self._spool)
            self._spool.seek(0)
            yield self._spool
            return
        with open(self.path, "rb") as f:
            info = os.fstat(f.fileno())
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            if self._stamp is not None and stamp != self._stamp:
                raise UsageError(f"--input {self.name} changed while this run was reading it; run again on a file "
                                 "that stays put")
            self._stamp = stamp
            yield f

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()


def _chunks(rows: Iterable[InputRow], size: int) -> Iterator[list[InputRow]]:
    chunk: list[InputRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run(settings: ScoreSettings, input: str, output: str, console: Console,
        source: ModelSource | None = None) -> int:
    """Score the rows of ``input`` (JSONL file, or - for stdin) into ``output`` (.jsonl, .parquet, or - for
    stdout), resuming by id. Returns the exit code; UsageError for bad input or an output fault."""
    source = source or ModelSource(settings.model, console)
    src = InputFile(input)
    try:
        with Sink(output) as sink:            # the lock first: a second run on this output fails at once
            return _run(settings, src, sink, output, console, source)
    except (RowError, OutputError) as e:
        raise UsageError(str(e)) from None
    finally:
        src.close()


def _run(settings, src: InputFile, sink: Sink, output: str, console: Console, source: ModelSource) -> int:
    name = src.name
    # pass 1: each row alone, the ids across rows, the kept fields' kinds (no tokenizer, no model)
    checker = RowChecker()
    kept = KeptFields(settings)
    with src.lines() as lines:
        for chunk in _chunks(iter_rows(lines, name, checker), TOKENIZE_CHUNK):
            if sink.parquet:
                check_parquet_ids(chunk, name)
            kept.add(chunk, name)
    id_kind = checker.finish(name)
    sink.resume(settings.record(id_kind, source.model_id(), kept.types(name), parquet=sink.parquet))
    total = checker.count
    todo = total - sum(1 for row_id in checker.ids if row_id in sink.done)
    if not todo:
        console.info(f"nothing to do: all {total} rows of {name} are in {output}")
        sink.finish()
        return 0

    def pending(lines):
        return (row for row in iter_rows(lines, name) if row.id not in sink.done)

    # pass 2: the rows to score against the model's config and tokenizer (the weights are not read yet)
    source.check(settings.scorer.layers)
    job = ScoreJob(settings, console=console, source=source)
    top, top_id = None, -1                       # the token row holding the largest token id
    with src.lines() as lines:
        for chunk in _chunks(pending(lines), TOKENIZE_CHUNK):
            job.tokenize(chunk, name)
            for row in chunk:
                largest = max(row.prompt_ids + row.response_ids) if not row.is_text else -1
                if largest > top_id:
                    top, top_id = row, largest
    job.load()
    if top is not None:
        job.check_embeddings([top], name)
    # pass 3: score and append, micro-batch by micro-batch
    written = 0
    try:
        with console.progress(total=total, initial=total - todo, desc="scoring", unit="row") as bar, \
                src.lines() as lines:
            for chunk in _chunks(pending(lines), settings.scorer.micro_batch_size):
                sink.append(job.score_rows(chunk, name))
                written += len(chunk)
                bar.update(len(chunk))
    except KeyboardInterrupt:
        console.info(f"interrupted: {written} new rows written to {output}; run the same command to resume")
        return 130
    sink.finish()
    console.info(f"wrote {written} rows to {output}" + (f" ({total - todo} already there)" if total > todo else ""))
    return 0
