"""``rhythm score --ray``: the score job on a Ray cluster (Ray Data), every id written exactly once.

    from rhythm.app.distributed import RayOptions, score_dataset
    from rhythm.app.score import ScoreSettings

    report = score_dataset(ScoreSettings(model="path/to/model"), "rollouts/", "scored/",
                           RayOptions(address=None, workers=4, gpus_per_worker=1))

1. The driver checks every input row (:mod:`rhythm.app.dataset_input`: ids, token ids, duplicates, lengths
   against the model's config, with the tokenizer only) before any worker starts, then takes the output's lock,
   checks its stored settings and reads the ids already written (:mod:`rhythm.app.dataset_output`).
2. The rows still to do are cut into blocks (``block_rows`` consecutive rows of one file);
   ``ray.data.from_items(blocks).map_batches(ScoreWorker, compute=ActorPoolStrategy(size=workers))``: each
   worker is an actor that loads the model once (:class:`rhythm.app.score.ScoreJob`, the single-process
   settings object and code), reads its block's rows back from the input, scores them in micro-batches and
   writes the block as one Parquet file (atomic rename, a name fixed by the block's rows).
3. Faults: a worker process that dies (SIGKILL, OOM, a lost node) is restarted by Ray and its block is
   retried on it (Ray Data's actor default ``max_restarts=-1``); the retry writes the same file name, so no row
   is doubled. A block is retried at most ``max_retries`` times: each start of a block is counted in the output
   folder (:func:`rhythm.app.dataset_output.count_start`), and the start after ``max_retries`` retries raises
   :class:`BlockKilledWorkers` in the worker instead of scoring (an exception Ray does not retry), so a row
   that kills every worker it runs on (an out-of-memory row) stops the job with one line naming the block's
   rows instead of being retried forever (Ray's own retries are unbounded). An exception raised by the scoring
   code is not retried: the job stops with it, blocks already written stay. When the job ends the driver checks
   every input id is in exactly one part file.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace

from rhythm_kernels.segments import is_integer, is_real

from rhythm.app.dataset_input import Block, InputFiles, open_input, plan_blocks, read_block, scan
from rhythm.app.dataset_output import DatasetSink, clear_starts, count_start, part_name, rows_written, write_part
from rhythm.app.output import OutputError
from rhythm.app.rows import RowError
from rhythm.config import ConfigError

RAY_INSTALL = "pip install 'attention-rhythm[ray]' (Ray Data: ray[data], pyarrow, pandas)"


class RayMissing(ImportError):
    """Ray Data is not installed (the message says what to install)."""


class WorkerFailed(RuntimeError):
    """The scoring code raised in a worker (not retried), or a block took down its worker more often than
    ``max_retries`` allows; the blocks written before stay."""


class BlockKilledWorkers(RuntimeError):
    """Raised in a worker instead of starting a block whose earlier starts all ended with their worker dead,
    ``max_retries + 1`` of them (the message names the block's rows)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a distributed job runs.

    address: a Ray cluster (``auto``, ``ray://host:10001``, ``host:6379``); None starts a local instance (or
    uses the one this process already joined). workers: actors, each holding one model.
    gpus_per_worker / cpus_per_worker: Ray resources per actor (with GPUs the model runs on ``cuda``; torch
    uses ``cpus_per_worker`` threads). block_rows: rows per block (one part file, one retry unit).
    max_retries: how many times a block is started again after the worker running it died (0: never); one more
    death and the job stops, naming the block's rows."""

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    block_rows: int = 64
    max_retries: int = 3

    def __post_init__(self):
        for name, low in (("workers", 1), ("block_rows", 1), ("max_retries", 0)):
            value = getattr(self, name)
            if not is_integer(value) or value < low:
                raise ValueError(f"RayOptions.{name} must be an int >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))      # numpy integers as plain ints (Ray, JSON)
        for name in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if not is_real(value) or not 0 <= value < float("inf"):
                raise ValueError(f"RayOptions.{name} must be a finite number >= 0, got {value!r}")
            if not isinstance(value, (int, float)):
                object.__setattr__(self, name, float(value))   # a numpy number as the float it holds


@dataclass
class JobReport:
    """What a job did: input rows, rows already in the output, rows written now, part files written now,
    the worker processes (pids) that wrote them, and repairs made at the end."""

    rows: int
    skipped: int
    written: int = 0
    parts: int = 0
    workers: set = field(default_factory=set)
    notes: list = field(default_factory=list)


def require_ray():
    """The ``ray`` module with Ray Data, or RayMissing saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayMissing(f"--ray needs Ray Data ({e}): {RAY_INSTALL}") from None
    return ray


def score_dataset(settings, input: str, output: str, options: RayOptions = RayOptions(), console=None) -> JobReport:
    """Score every row of ``input`` (JSONL or Parquet: a file, a folder, or a URI pyarrow reads) into the
    Parquet dataset folder ``output`` on Ray, skipping the ids already there.

    settings: a :class:`rhythm.app.score.ScoreSettings` (its ``device`` must be None: workers use ``cuda``
    when ``options.gpus_per_worker > 0``, else the CPU). Raises before any worker starts: RowError / InputError
    (bad input; UsageError for an int id beyond int64), OutputError (an output scored with other settings, or
    locked by another job), ConfigError (grouping "fixed"). WorkerFailed: the scoring code raised in a worker,
    or a block's worker died more than ``options.max_retries`` times."""
    from rhythm.app.common import Console, ModelSource
    from rhythm.app.score import KeptFields, ScoreJob, check_parquet_ids

    console = console or Console(quiet=True)
    ray = require_ray()
    if settings.device is not None:
        raise ConfigError(f"settings.device must be None with Ray (got {settings.device!r}): workers use cuda when "
                         "gpus_per_worker > 0, else the CPU")
    if settings.scorer.grouping == "fixed":
        raise ConfigError("--grouping fixed takes the head groups from a process's first micro-batch, so each Ray "
                          "worker would choose its own: use --grouping per_sequence (the default) with --ray")
    files = open_input(input)
    source = ModelSource(settings.model)
    job = ScoreJob(settings, source=source)          # the tokenizer and the model's config only: no weights

    kept = KeptFields(settings)

    def check(rows, name):
        job.tokenize(rows, name)
        check_parquet_ids(rows, name)
        kept.add(rows, name)

    index = scan(files, check)
    record = settings.record(index.id_kind, source.model_id(), kept.types(input), parquet=True)
    sink = DatasetSink(output, record)
    with sink.lock():
        sink.open()
        blocks = plan_blocks(index, sink.done, options.block_rows)
        report = JobReport(rows=len(index.id), skipped=len(index.id) - sum(len(b.lines) for b in blocks))
        if blocks:
            _run(ray, settings, files, str(sink.folder.resolve()), record, blocks, options, console, report)
        report.notes = sink.finish(set(index.id))
    return report


def _run(ray, settings, files, folder, record, blocks, options, console, report) -> None:
    import logging

    import numpy as np

    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=not console.quiet,
                 logging_level=logging.ERROR if console.quiet else logging.WARNING)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False          # our own bar (rows), on a terminal only
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        worker = _worker_class(replace(settings, device="cuda" if options.gpus_per_worker else None), files,
                               folder, record, options.max_retries)
        items = [{"block": b.to_json()} for b in blocks]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            worker, batch_size=1, num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker or None,
            # one block in flight per actor: a free worker takes the next block (none queue behind a busy one).
            # Ray Data's actor defaults apply: max_restarts=-1 (a dead actor is replaced) and max_task_retries=-1
            # (its block is retried on the new one); the workers' own start count bounds the retries of a block
            # (Ray's bound would not name the block, and map_batches takes it only through ray_remote_args,
            # deprecated in Ray 2.60 and removed in 2.64).
            compute=ray.data.ActorPoolStrategy(size=options.workers, max_tasks_in_flight_per_actor=1))
        with console.progress(total=report.rows, initial=report.skipped, desc="scoring", unit="row") as bar:
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    n = int(np.sum(batch["rows"]))
                    report.written += n
                    report.parts += len(batch["rows"])
                    report.workers.update(int(p) for p in batch["pid"])
                    bar.update(n)
            except (ray.exceptions.RayError, ray.data.exceptions.UserCodeException) as e:
                # the rows on disk, not report.written: blocks finish before the driver has read their records
                raised, written = _raised_in_worker(e), rows_written(folder)
                if raised is not None and raised[0].rsplit(".", 1)[-1] == BlockKilledWorkers.__name__:
                    raise WorkerFailed(f"{raised[1]}; the {written} rows written are in {folder}") from e
                what = f"{raised[0].rsplit('.', 1)[-1]}: {raised[1]}" if raised is not None else _last_line(e)
                raise WorkerFailed(f"a worker failed ({what}); the {written} rows written are in {folder}: "
                                   "run the same command to resume") from e
    finally:
        clear_starts(folder)
        if started:
            ray.shutdown()


_RAISED = re.compile(r"^([A-Za-z_][\w.]*): (.+)$")      # "module.Type: message", a traceback's last line


def _raised_in_worker(error: BaseException) -> tuple[str, str] | None:
    """(type, first line of the message) of the exception the worker's code raised, read from the traceback
    text Ray sends back (the driver gets the worker's exception as text only: Ray 2.60's RayTaskError carries a
    UserCodeException without the original as its cause); None when the text names none but Ray's own."""
    found = None
    for line in str(error).splitlines():
        match = _RAISED.match(line.rstrip())
        if match and not match.group(1).startswith("ray."):
            found = match.group(1), match.group(2).strip()
    return found


def _last_line(error: BaseException) -> str:
    """The last non-blank line of an error's text (its type's name when it has none)."""
    return ([line.strip() for line in str(error).splitlines() if line.strip()][-1:] or [type(error).__name__])[0]


def _worker_class(settings, files: InputFiles, folder: str, record: dict, max_retries: int):
    """The actor class of a job (its settings captured here, so Ray ships them with the class)."""

    class ScoreWorker:
        """One Ray actor: the model loaded once; each call scores the blocks of its batch into part files."""

        def __init__(self):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from rhythm.app.score import ScoreJob

            self.job = ScoreJob(settings)
            self.job.load()

        def __call__(self, batch):
            import numpy as np

            parts, counts = [], []
            for text in batch["block"]:
                block = Block.from_json(str(text))
                rows = read_block(files, block)
                name = part_name(block.file, block.lines[0], [row.id for row in rows])
                starts = count_start(folder, name)
                if starts > max_retries + 1:
                    raise BlockKilledWorkers(_killed_message(files.names[block.file], block, rows, starts - 1,
                                                             max_retries))
                scored = self.job.score_rows(rows, files.names[block.file])
                write_part(folder, name, scored, record)
                parts.append(name)
                counts.append(len(rows))
            return {"part": np.array(parts), "rows": np.array(counts), "pid": np.array([os.getpid()] * len(parts))}

    return ScoreWorker


def _killed_message(file: str, block: Block, rows, deaths: int, max_retries: int) -> str:
    """One line: the rows of a block that took down ``deaths`` workers, and what to do."""
    ids = ", ".join(repr(row.id) for row in rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
    where = f"line {block.lines[0]}" if len(block.lines) == 1 else f"lines {block.lines[0]}-{block.lines[-1]}"
    return (f"the block of {file} {where} (ids {ids}) was running each time its worker died, {deaths} times "
            f"(--max-retries {max_retries}): drop or shorten those rows, or lower --micro-batch-size (--block-rows 1 "
            "finds the row), then run the same command to resume")


def run(settings, input: str, output: str, options: RayOptions, console) -> int:
    """``rhythm score --ray``: :func:`score_dataset` with its messages; UsageError for bad input (one line)."""
    from rhythm.app.common import UsageError
    from rhythm.app.dataset_input import InputError

    try:
        report = score_dataset(settings, input, output, options, console)
    except (RowError, InputError, OutputError, ConfigError, RayMissing) as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        console.info(f"interrupted: the blocks written so far are in {output}; run the same command to resume")
        return 130
    except WorkerFailed as e:
        print(f"rhythm: error: {e}", file=sys.stderr)
        return 1
    for note in report.notes:
        console.info(f"repaired {note}")
    if not report.written:
        console.info(f"nothing to do: all {report.rows} rows of {input} are in {output}")
    else:
        console.info(f"wrote {report.written} rows in {report.parts} files to {output} with "
                     f"{len(report.workers)} worker process(es)"
                     + (f" ({report.skipped} already there)" if report.skipped else ""))
    return 0


__all__ = ["BlockKilledWorkers", "JobReport", "RAY_INSTALL", "RayMissing", "RayOptions", "WorkerFailed",
           "require_ray", "run", "score_dataset", "OutputError", "RowError"]
