"""Output of ``rhythm score``: rows appended as they are scored, resumable, never lost or doubled.

- ``out.jsonl``: rows are appended and fsynced per micro-batch. On resume a last line without its newline is
  kept when it is a complete row (the newline is added) and dropped when it is torn (a killed write: that row
  is scored again). Any other unreadable line, and an id on two lines, is refused (the file was edited or
  corrupted).
- ``out.parquet``: rows go to ``out.parquet.partial.jsonl`` as above and are converted when the run completes,
  with a schema built from the settings (never from the first row) and the settings in the file's metadata.
- ``-``: JSONL on stdout (no resume).

One run at a time: a run holds an exclusive lock on ``<output>.lock`` from start to end (a second run on the same
output fails at once). The settings that change a number (model, dtype, window, strategies, q, ...) are stored
next to the output (``out.jsonl.settings.json``); a resume whose settings differ is refused, naming both values.
A write that fails (a full disk, a file size limit) leaves the file as it was before that micro-batch.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from pathlib import Path

from rhythm.app.journal_lines import read_complete_lines

SETTINGS_FORMAT = 1
PARQUET_KEY = b"rhythm_score_settings"
# Parquet column types of the input fields kept in the output rows (settings "keep_types"); "json": JSON text.
KEEP_TYPES = ("bool", "int", "float", "str", "json")
ROW_KEYS = ("id", "waad")          # a line of the journal holding these is a complete scored row


class OutputError(ValueError):
    """The output cannot be resumed or written (the message says why and what to do)."""


def settings_path(output: Path) -> Path:
    return output.with_name(output.name + ".settings.json")


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def check_regular(path: Path, what: str, flag: str = "--output") -> None:
    """``path`` is absent or a regular file (a FIFO, a device or a folder would block or fail late); the error
    names ``flag``, the option that chose the path."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device or socket")
        raise OutputError(f"{what} {path} is {kind}, not a regular file; choose another {flag}")


@contextlib.contextmanager
def output_lock(output: Path):
    """Hold the exclusive lock of ``output`` (``<output>.lock``) for the ``with`` block; OutputError at once,
    naming the output, when another run holds it."""
    from rhythm.models import LockBusy, exclusive_lock

    path = lock_path(output)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(path, wait=False))
        except LockBusy:
            raise OutputError(f"{output} is being written by another rhythm score run (it holds {path.name}); "
                              "wait for it to finish, or choose another --output") from None
        except OSError as e:
            raise OutputError(f"cannot lock {path} ({e.strerror or e})") from None
        yield


class Sink:
    """Where scored rows go. ``Sink(output)`` takes the output's lock (held until :meth:`close`);
    :meth:`resume` checks the settings and reads the ids already written into ``done`` (typed: 1 and "1"
    differ); ``Sink(output, settings)`` does both. A context manager: the lock is released on exit."""

    def __init__(self, output: str, settings: dict | None = None):
        self.stdout = output == "-"
        self.settings: dict | None = None
        self.done: set = set()
        self.lock = None
        if self.stdout:
            self.output = self.journal = None
            self.parquet = False
            return
        self.output = Path(output)
        self.parquet = self.output.suffix == ".parquet"
        self.journal = self.output.with_name(self.output.name + ".partial.jsonl") if self.parquet else self.output
        for path, what in ((self.output, "--output"), (self.journal, "the journal"),
                           (settings_path(self.output), "the settings file"),
                           (lock_path(self.output), "the lock file")):
            check_regular(path, what)
        self.lock = contextlib.ExitStack()
        self.lock.enter_context(output_lock(self.output))
        if settings is not None:
            try:
                self.resume(settings)
            except BaseException:
                self.close()
                raise

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def resume(self, settings: dict) -> None:
        """Check ``settings`` against those stored with the output (or store them) and read the ids done."""
        self.settings = settings
        if self.stdout:
            return
        for path in {self.output, self.journal}:
            if path.exists() and not os.access(path, os.W_OK):
                raise OutputError(f"--output: {path} is not writable (read-only); make it writable, or choose "
                                  "another --output")
        self._check_settings()
        if self.parquet and self.output.exists():
            self.done |= set(_read_parquet_ids(self.output))
        if self.journal.exists():
            self.done |= set(_repair_and_read_ids(self.journal))

    # -- settings ------------------------------------------------------------------------------------------------
    def _has_rows(self) -> bool:
        return any(p.exists() and p.stat().st_size > 0 for p in {self.output, self.journal})

    def _check_settings(self) -> None:
        check_stored_settings(self.output, self.settings, has_rows=self._has_rows(),
                              parquet_settings=lambda: read_parquet_settings(self.output)
                              if self.parquet and self.output.exists() else None)

    # -- rows ----------------------------------------------------------------------------------------------------
    def append(self, rows: list[dict]) -> None:
        """Write finished rows (one JSON line each) and make them durable before returning. A failed write
        leaves the file as it was before (OutputError; the rows written before are kept)."""
        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
        if self.stdout:
            sys.stdout.write(text)      # a closed pipe raises BrokenPipeError: the command exits quietly
            sys.stdout.flush()
            return
        _append_durably(self.journal, text.encode("utf-8"))
        self.done.update(row["id"] for row in rows)

    def finish(self) -> None:
        """Parquet: merge the journal into the output (explicit schema, settings in the metadata)."""
        if not self.parquet or not self.journal.exists():
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = parquet_schema(self.settings)
        tables, merged = [], set()
        if self.output.exists():
            tables.append(_read_parquet(self.output).select(schema.names).cast(schema))
            merged = set(tables[0].column("id").to_pylist())
        with self.journal.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        # a run killed between replacing the output and deleting the journal: those rows are merged already
        rows = [parquet_row(row, self.settings) for row in rows if row["id"] not in merged]
        tables.append(pa.Table.from_pylist(rows, schema=schema))
        table = pa.concat_tables(tables).replace_schema_metadata(
            {PARQUET_KEY: json.dumps(self.settings).encode("utf-8")})
        tmp = self.output.with_name(self.output.name + ".tmp")
        try:
            pq.write_table(table, tmp)
            tmp.replace(self.output)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {self.output} ({e.strerror or e}); every scored row is kept in "
                              f"{self.journal.name}: free space and run the same command to finish") from None
        self.journal.unlink()


def check_stored_settings(output: Path, settings: dict, *, has_rows: bool, parquet_settings=None,
                          flag: str = "--output", tool: str = "rhythm score") -> None:
    """The resume rule for an output (a file, or a folder of part files): the settings stored next to it
    (``settings_path(output)``; else ``parquet_settings()``, those in its Parquet metadata) must equal
    ``settings`` when it already holds rows; otherwise ``settings`` are stored. OutputError naming both values
    of each setting that differs. ``flag`` / ``tool``: the option that chose ``output`` and the command that
    writes it, as the messages name them (``rhythm probe`` stores its settings by this rule under ``--out``)."""
    path = settings_path(output)
    check_regular(path, "the settings file", flag)
    stored = None
    if path.exists():
        stored = _read_settings_file(path, output, flag, tool)
    elif parquet_settings is not None:
        stored = parquet_settings()
    if stored is None:
        if has_rows:
            raise OutputError(f"{output} already holds rows but no record of the settings they were scored "
                              f"with ({path.name} is missing); choose another {flag} or delete it")
        _write_settings(path, settings, flag)
        return
    differ = [key for key in sorted(set(stored) | set(settings))
              if stored.get(key, _ABSENT) != settings.get(key, _ABSENT)]
    if differ and not has_rows:
        _write_settings(path, settings, flag)    # nothing was scored with the old settings
    elif differ:
        pairs = "; ".join(f"{key}: {_show(stored.get(key, _ABSENT))} there, {_show(settings.get(key, _ABSENT))} now"
                          for key in differ)
        raise OutputError(f"{output} was scored with other settings ({pairs}); resume with the same "
                          f"settings, or write to another {flag}")


def _write_settings(path: Path, settings: dict, flag: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps({"format": SETTINGS_FORMAT, "settings": settings}, indent=1) + "\n",
                       encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path} ({e.strerror or e}); free space or choose another {flag}") from None


def _append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and fsync; on failure cut the file back to its size before (OutputError)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError(f"cannot open {path} for writing ({e.strerror or e})") from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass               # the torn tail is cut on resume
            raise OutputError(f"cannot write to {path} ({e.strerror or e}); the rows written before are kept: "
                              "free space (or raise the file size limit) and run the same command to resume") \
                from None
    finally:
        os.close(fd)


def parquet_schema(settings: dict):
    """The Parquet schema of a run, from its settings: id (int64 or string), prompt_length, response_ids, one
    float32 list per signal and per gamma strategy, then the kept input fields (settings "keep_types")."""
    import pyarrow as pa

    id_type = pa.string() if settings["ids"] == "str" else pa.int64()
    fields = [("id", id_type), ("prompt_length", pa.int64()), ("response_ids", pa.list_(pa.int64())),
              ("waad", pa.list_(pa.float32())), ("fai", pa.list_(pa.float32())), ("fai_valid", pa.list_(pa.bool_()))]
    fields += [(f"gamma_{s}", pa.list_(pa.float32())) for s in settings["strategies"]]
    types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string(), "json": pa.string()}
    fields += [(name, types[kind]) for name, kind in settings.get("keep_types", {}).items()]
    return pa.schema(fields)


def parquet_row(row: dict, settings: dict) -> dict:
    """An output row as Parquet takes it (``parquet_schema(settings)``): kept fields of kind "json" as JSON
    text."""
    text = {name: json.dumps(row[name], allow_nan=False) for name, kind in settings.get("keep_types", {}).items()
            if kind == "json" and row.get(name) is not None}
    return {**row, **text} if text else row


def keep_type(kinds: set) -> str:
    """The Parquet column kind of a kept field from the JSON kinds of its non-null values (KEEP_TYPES)."""
    if kinds <= {"bool"}:
        return "bool"
    if kinds <= {"int"}:
        return "int"
    if kinds <= {"int", "float"}:
        return "float"
    if kinds <= {"str"}:
        return "str"
    return "json"


def value_kind(value) -> str | None:
    """The JSON kind of a kept value for :func:`keep_type` (None for null; "other" for ints beyond int64,
    lists and objects)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(1 << 63) <= value < (1 << 63) else "other"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "other"


def _read_settings_file(path: Path, output: Path, flag: str, tool: str) -> dict:
    """The settings stored in ``path`` (OutputError when it is not a settings file written by ``tool``)."""
    bad = f"{path} is not a settings file written by {tool}; delete it together with {output}, or choose another {flag}"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):   # not UTF-8, not JSON, nested too deep
        raise OutputError(bad) from None
    except OSError as e:
        raise OutputError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("settings"), dict):
        raise OutputError(bad)
    return stored["settings"]


def _repair_and_read_ids(path: Path) -> list:
    """Ids of the complete rows of a JSONL journal (:func:`rhythm.app.journal_lines.read_complete_lines`: a torn
    last line is cut off, a complete last row without its newline gets one). Other unreadable lines, and an id
    on two lines, are refused."""
    seen: dict = {}
    for number, row in read_complete_lines(path, ROW_KEYS, lambda number: OutputError(
            f"{path}:{number}: not a complete scored row (the file was edited or corrupted); repair or delete "
            "that line, or choose another --output")):
        key = (type(row["id"]), row["id"])
        if key in seen:
            raise OutputError(f"{path}:{number}: id {row['id']!r} is also on line {seen[key]} (a doubled row); "
                              "delete one of the two lines, or choose another --output")
        seen[key] = number
    return [row_id for _, row_id in seen]


def _read_parquet(path: Path, columns=None):
    """The table of a Parquet output (OutputError when it cannot be read: truncated, corrupted, not Parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise OutputError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0] if str(e) else e}); "
                          "delete it (and its .settings.json) to score again, or choose another --output") from None


def _read_parquet_ids(path: Path) -> list:
    ids = _read_parquet(path, columns=["id"]).column("id").to_pylist()
    first: dict = {}
    for i, row_id in enumerate(ids):
        if row_id in first:
            raise OutputError(f"{path}: id {row_id!r} is in rows {first[row_id]} and {i} (a doubled row); "
                              "choose another --output")
        first[row_id] = i
    return ids


def read_parquet_settings(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as e:
        raise OutputError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0] if str(e) else e}); "
                          "delete it to score again, or choose another --output") from None
    text = meta.get(PARQUET_KEY)
    if text is None:
        return None
    try:
        stored = json.loads(text)
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        raise OutputError(f"{path}: its rhythm settings metadata is not readable; choose another --output")
    return stored


_ABSENT = object()


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)
