"""Output of ``rhythm score``: rows appended as they are scored, resumable, never lost or doubled.

- ``out.jsonl``: rows are appended and fsynced per micro-batch. On resume a last line without its newline is
  kept when it is a complete row (the newline is added) and dropped when it is torn (a killed write: that row
  is scored again). Any other unreadable line is refused (the file was edited or corrupted).
- ``out.parquet``: rows go to ``out.parquet.partial.jsonl`` as above and are converted when the run completes,
  with a schema built from the settings (never from the first row) and the settings in the file's metadata.
- ``-``: JSONL on stdout (no resume).

The settings that change a number (model, dtype, window, strategies, q, ...) are stored next to the output
(``out.jsonl.settings.json``); a resume whose settings differ is refused, naming both values.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SETTINGS_FORMAT = 1
PARQUET_KEY = b"rhythm_score_settings"


class OutputError(ValueError):
    """The output cannot be resumed or written (the message says why and what to do)."""


def settings_path(output: Path) -> Path:
    return output.with_name(output.name + ".settings.json")


class Sink:
    """Where scored rows go. ``done`` holds the ids already written (typed: 1 and "1" differ)."""

    def __init__(self, output: str, settings: dict):
        self.stdout = output == "-"
        self.settings = settings
        self.done: set = set()
        if self.stdout:
            self.output = self.journal = None
            self.parquet = False
            return
        self.output = Path(output)
        self.parquet = self.output.suffix == ".parquet"
        self.journal = self.output.with_name(self.output.name + ".partial.jsonl") if self.parquet else self.output
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
        """Write finished rows (one JSON line each) and make them durable before returning."""
        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
        if self.stdout:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
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
            tables.append(pq.read_table(self.output).select(schema.names).cast(schema))
            merged = set(tables[0].column("id").to_pylist())
        with self.journal.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        # a run killed between replacing the output and deleting the journal: those rows are merged already
        rows = [row for row in rows if row["id"] not in merged]
        tables.append(pa.Table.from_pylist(rows, schema=schema))
        table = pa.concat_tables(tables).replace_schema_metadata(
            {PARQUET_KEY: json.dumps(self.settings).encode("utf-8")})
        tmp = self.output.with_name(self.output.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(self.output)
        self.journal.unlink()


def check_stored_settings(output: Path, settings: dict, *, has_rows: bool, parquet_settings=None) -> None:
    """The resume rule for an output (a file, or a folder of part files): the settings stored next to it
    (``settings_path(output)``; else ``parquet_settings()``, those in its Parquet metadata) must equal
    ``settings`` when it already holds rows; otherwise ``settings`` are stored. OutputError naming both values
    of each setting that differs."""
    path = settings_path(output)
    stored = None
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))["settings"]
        except (ValueError, KeyError, TypeError):
            raise OutputError(f"{path} is not a settings file written by rhythm score; delete it together with "
                              f"{output}, or choose another --output") from None
    elif parquet_settings is not None:
        stored = parquet_settings()
    if stored is None:
        if has_rows:
            raise OutputError(f"{output} already holds rows but no record of the settings they were scored "
                              f"with ({path.name} is missing); choose another --output or delete it")
        _write_settings(path, settings)
        return
    differ = [key for key in sorted(set(stored) | set(settings))
              if stored.get(key, _ABSENT) != settings.get(key, _ABSENT)]
    if differ and not has_rows:
        _write_settings(path, settings)          # nothing was scored with the old settings
    elif differ:
        pairs = "; ".join(f"{key}: {_show(stored.get(key, _ABSENT))} there, {_show(settings.get(key, _ABSENT))} now"
                          for key in differ)
        raise OutputError(f"{output} was scored with other settings ({pairs}); resume with the same "
                          "settings, or write to another --output")


def _write_settings(path: Path, settings: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": SETTINGS_FORMAT, "settings": settings}, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def parquet_schema(settings: dict):
    """The Parquet schema of a run, from its settings: id (int64 or string), prompt_length, response_ids and
    one float32 list per signal and per gamma strategy."""
    import pyarrow as pa

    id_type = pa.string() if settings["ids"] == "str" else pa.int64()
    fields = [("id", id_type), ("prompt_length", pa.int64()), ("response_ids", pa.list_(pa.int64())),
              ("waad", pa.list_(pa.float32())), ("fai", pa.list_(pa.float32())), ("fai_valid", pa.list_(pa.bool_()))]
    fields += [(f"gamma_{s}", pa.list_(pa.float32())) for s in settings["strategies"]]
    return pa.schema(fields)


def _repair_and_read_ids(path: Path) -> list:
    """Ids of the complete rows of a JSONL journal; a torn last line (no newline, not a complete row) is cut
    off, a complete last row without its newline gets one. Other unreadable lines are refused."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        if _complete_row(tail):
            with path.open("ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            data += b"\n"
        else:
            with path.open("rb+") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            data = data[:cut]
    ids = []
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        row = _complete_row(line)
        if row is None:
            raise OutputError(f"{path}:{number}: not a complete scored row (the file was edited or corrupted); "
                              "repair or delete that line, or choose another --output")
        ids.append(row["id"])
    return ids


def _complete_row(line: bytes):
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return row if isinstance(row, dict) and "id" in row and "waad" in row else None


def _read_parquet_ids(path: Path) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def read_parquet_settings(path: Path):
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    text = meta.get(PARQUET_KEY)
    return None if text is None else json.loads(text)


_ABSENT = object()


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)
