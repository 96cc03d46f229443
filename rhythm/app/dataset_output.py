"""Output of a distributed ``rhythm score``: a Parquet dataset folder, one file per block, every id once.

    out/                                   the dataset (read it with pyarrow.dataset or datasets' "parquet")
      part-00000-000000001-1a2b3c4d.parquet  one block: input file 0, from line 1, digest of its ids
      .part-....parquet.tmp                a block being written (hidden: dataset readers skip it)
      .part-....parquet.attempts           while a job runs: how often it started the block (count_start)
    out.settings.json                      the settings the rows were scored with (as for ``rhythm score``)

A block is written to a hidden temporary file and renamed into place, so a worker killed mid-write leaves no
part file (only a ``.tmp``, deleted on the next start), and a block retried after a kill rewrites the same
name. A block's name is fixed by its rows (input file, first line, sha256 of its ids), never by a worker or a
clock. The ids already in part files are skipped when a job starts again; every part file also carries the
settings in its Parquet metadata (``rhythm_score_settings``, as the single-process ``.parquet`` output).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from rhythm.app.output import PARQUET_KEY, OutputError, check_stored_settings, output_lock, parquet_row, \
    parquet_schema, read_parquet_settings

PART_GLOB = "part-*.parquet"


def part_name(file_index: int, first_line: int, ids) -> str:
    """The deterministic file name of a block: input file, first line, and a digest of its ids."""
    digest = hashlib.sha256(json.dumps(list(ids)).encode("utf-8")).hexdigest()[:8]
    return f"part-{file_index:05d}-{first_line:09d}-{digest}.parquet"


def write_part(folder: str | Path, name: str, rows: list[dict], settings: dict) -> Path:
    """Write one block atomically: a hidden temporary file, fsynced, then renamed to ``folder/name``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    rows = [parquet_row(row, settings) for row in rows]
    table = pa.Table.from_pylist(rows, schema=parquet_schema(settings)).replace_schema_metadata(
        {PARQUET_KEY: json.dumps(settings).encode("utf-8")})
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    with tmp.open("wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / name)
    return folder / name


def rows_written(folder: str | Path) -> int:
    """How many rows the part files in ``folder`` hold (from their Parquet footers)."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(path).num_rows for path in Path(folder).glob(PART_GLOB))


def count_start(folder: str | Path, name: str) -> int:
    """Record one more start of the block ``name`` in ``folder/.<name>.attempts`` (one byte a start, appended
    and fsynced) and return how many starts of it this job has recorded, this one included. A block is started
    again only when the worker running it died, so the count less one is how many workers it took down."""
    fd = os.open(Path(folder) / f".{name}.attempts", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, b".")
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def clear_starts(folder: str | Path) -> None:
    """Delete the start counts of :func:`count_start` (a job counts its own starts only)."""
    for path in Path(folder).glob(".part-*.attempts"):
        path.unlink(missing_ok=True)


class DatasetSink:
    """The output folder of one job. ``with sink.lock(): sink.open()``: the folder made, stale temporaries
    removed, the settings checked (or stored), and ``done`` (the ids already written, typed) read from the
    part files' id columns.

    ``finish(expected)`` checks every id of ``expected`` is in exactly one part file; an id in two files (two
    jobs raced on one folder, or files were copied in) is dropped from the later file, saying so."""

    def __init__(self, output: str | Path, settings: dict):
        self.folder = Path(output)
        self.settings = settings
        self.done: set = set()
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"--output {self.folder} is a file; with --ray the output is a folder of Parquet files")

    @contextlib.contextmanager
    def lock(self):
        """An exclusive lock on the output (``<output>.lock``) for the whole job; OutputError at once when
        another job holds it."""
        with output_lock(self.folder):
            yield self

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.glob(".part-*.tmp"):      # blocks whose writer died before the rename
            tmp.unlink()
        clear_starts(self.folder)                          # left by a job whose driver was killed
        parts = self.parts()
        check_stored_settings(self.folder, self.settings, has_rows=bool(parts),
                              parquet_settings=lambda: read_parquet_settings(parts[0]) if parts else None)
        for path in parts:
            self.done.update(_read_ids(path))

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob(PART_GLOB))

    def finish(self, expected: set) -> list[str]:
        """Every expected id once; returns the notes of what was repaired (duplicates dropped)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        notes, seen, missing = [], {}, set(expected)
        for path in self.parts():
            ids = _read_ids(path)
            doubled = [i for i in ids if i in seen]
            if doubled:
                table = pq.read_table(path)
                keep = pc.invert(pc.is_in(table.column("id"), value_set=_array(doubled, table.schema)))
                kept = table.filter(keep)
                notes.append(f"{path.name}: {len(doubled)} id(s) also in {seen[doubled[0]]} dropped "
                             f"(e.g. {doubled[0]!r})")
                if kept.num_rows:
                    write_part(self.folder, path.name, kept.to_pylist(), self.settings)
                else:
                    path.unlink()
                ids = [i for i in ids if i not in seen]
            for i in ids:
                seen[i] = path.name
            missing.difference_update(ids)
        if missing:
            raise OutputError(f"{self.folder}: {len(missing)} id(s) were not written (e.g. {next(iter(missing))!r}); "
                              "run the same command again to score them")
        return notes


def _array(values, schema):
    import pyarrow as pa

    return pa.array(values, type=schema.field("id").type)


def _read_ids(path: Path) -> list:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["id"]).column("id").to_pylist()
    except Exception as e:   # pyarrow raises several types for a damaged file
        raise OutputError(f"{path} is not a readable Parquet block ({type(e).__name__}: {e}); delete it (its rows "
                          "are scored again) or choose another --output") from None
