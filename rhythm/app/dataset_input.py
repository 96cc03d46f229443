"""Input of a distributed ``rhythm score``: JSONL or Parquet rows from a file, a folder, or a URI that pyarrow's
filesystems read (``s3://...``, ``gs://...``, ``hdfs://...``), checked whole on the driver, then cut into blocks
that workers read back by byte range (JSONL) or row range (Parquet).

The check pass is the single-process one (:class:`rhythm.app.rows.RowChecker`, one row at a time, across every
file): ids present on every row or none, of one type, unique over the whole input; without ids a row's id is
its line number (so an input of several files needs ids). A Parquet row's number is its 1-based row index.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from rhythm.app.rows import InputRow, RowChecker, RowError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_CHUNK = 1 << 24      # bytes read per call while scanning a JSONL file


class InputError(ValueError):
    """The input path cannot be read as rows (the message names it)."""


@dataclass(frozen=True)
class InputFiles:
    """The files of one input: pyarrow filesystem, their paths on it, names for messages, one format."""

    filesystem: object
    paths: tuple[str, ...]
    names: tuple[str, ...]
    format: str


@dataclass(frozen=True)
class Block:
    """Rows a worker scores and writes as one part file: ``lines`` (1-based line / row numbers) of file
    ``file``, inside ``[start, stop)`` (bytes of a JSONL file, 0-based rows of a Parquet file)."""

    file: int
    start: int
    stop: int
    lines: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Block":
        d = json.loads(text)
        return cls(d["file"], d["start"], d["stop"], tuple(d["lines"]))


def open_input(path: str) -> InputFiles:
    """The input files under ``path`` (a file, or every .jsonl/.json/.parquet file below a folder, sorted,
    skipping names that start with . or _)."""
    import os

    from pyarrow import fs as pafs

    if "://" in path:
        filesystem, root = pafs.FileSystem.from_uri(path)
    else:
        filesystem, root = pafs.LocalFileSystem(), os.path.abspath(path)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"--input {path} does not exist")
    if info.type == pafs.FileType.File:
        found = [(root, path)]
    else:
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        found = sorted((i.path, path.rstrip("/") + "/" + i.path[len(root):].lstrip("/")) for i in infos
                       if i.type == pafs.FileType.File and _suffix(i.path) in FORMATS
                       and not any(part.startswith((".", "_")) for part in i.path[len(root):].split("/")))
        if not found:
            raise InputError(f"--input {path} is a folder without .jsonl or .parquet files")
    formats = {FORMATS.get(_suffix(p)) for p, _ in found}
    if None in formats:
        raise InputError(f"--input {path}: expected .jsonl, .json or .parquet, got {found[0][1]}")
    if len(formats) > 1:
        raise InputError(f"--input {path} mixes JSONL and Parquet files; give one format")
    return InputFiles(filesystem, tuple(p for p, _ in found), tuple(n for _, n in found), formats.pop())


def _suffix(path: str) -> str:
    dot = path.rfind(".")
    return path[dot:].lower() if dot > path.rfind("/") else ""


@dataclass
class RowIndex:
    """Where every row of an input is (filled by :func:`scan`): per row its file, line, byte or row range
    and id, in input order."""

    file: list
    line: list
    start: list
    stop: list
    id: list
    id_kind: str = "line"


def scan(files: InputFiles, check_batch) -> RowIndex:
    """Check every row (RowError naming ``name:line`` on the first bad one) and index it. ``check_batch(rows,
    name)`` runs the checks that need the tokenizer (vocabulary, positions) on batches of rows of one file."""
    from array import array

    checker = RowChecker()
    index = RowIndex(array("l"), array("q"), array("q"), array("q"), [])
    for number, (path, name) in enumerate(zip(files.paths, files.names)):
        batch = []
        for line, start, stop, row in _rows_of(files, path, name, checker):
            if number and checker.line_ids:
                raise RowError(f"{name}:{line}: rows without an 'id' in an input of several files (their ids "
                               "would be line numbers, repeated across files); give every row an id")
            index.file.append(number)
            index.line.append(line)
            index.start.append(start)
            index.stop.append(stop)
            index.id.append(row.id)
            batch.append(row)
            if len(batch) >= 256:
                check_batch(batch, name)
                batch = []
        if batch:
            check_batch(batch, name)
    index.id_kind = checker.finish(files.names[0] if len(files.names) == 1 else "--input")
    return index


def _rows_of(files: InputFiles, path: str, name: str, checker: RowChecker):
    """(line, start, stop, InputRow) of every row of one file, checked."""
    if files.format == "parquet":
        import pyarrow.parquet as pq

        with files.filesystem.open_input_file(path) as f:
            number = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for obj in batch.to_pylist():
                    number += 1
                    yield number, number - 1, number, checker.row(_present(obj), name, number)
        return
    with files.filesystem.open_input_stream(path) as f:
        offset, number, carry = 0, 0, b""
        while True:
            chunk = f.read(_CHUNK)
            data = carry + chunk
            lines = data.split(b"\n")
            carry = lines.pop() if chunk else b""
            for raw in lines:
                number += 1
                row = checker.line(raw, name, number)
                if row is not None:
                    yield number, offset, offset + len(raw), row
                offset += len(raw) + 1
            if not chunk:
                break


def _present(obj: dict) -> dict:
    """A Parquet row without the row keys that are null there (a column another row needs)."""
    from rhythm.app.rows import ROW_KEYS

    return {k: v for k, v in obj.items() if not (v is None and k in ROW_KEYS)}


def plan_blocks(index: RowIndex, done: set, block_rows: int) -> list[Block]:
    """The rows not in ``done``, in input order, cut into blocks of at most ``block_rows`` rows of one file."""
    blocks, current = [], []

    def close():
        if current:
            blocks.append(Block(index.file[current[0]], index.start[current[0]], index.stop[current[-1]],
                                tuple(index.line[i] for i in current)))
            current.clear()

    for i, row_id in enumerate(index.id):
        if row_id in done:
            continue
        if current and (index.file[i] != index.file[current[0]] or len(current) >= block_rows):
            close()
        current.append(i)
    close()
    return blocks


def read_block(files: InputFiles, block: Block) -> list[InputRow]:
    """The rows of one block, parsed again by the worker (the same parser as the check pass)."""
    from rhythm.app.rows import parse_row

    path, name, wanted = files.paths[block.file], files.names[block.file], set(block.lines)
    rows = []
    if files.format == "parquet":
        import pyarrow.parquet as pq

        with files.filesystem.open_input_file(path) as f:
            table = _row_range(pq.ParquetFile(f), block.start, block.stop)
        for offset, obj in enumerate(table.to_pylist()):
            number = block.start + 1 + offset
            if number in wanted:
                rows.append(parse_row(_present(obj), f"{name}:{number}", number))
        return rows
    with files.filesystem.open_input_file(path) as f:
        f.seek(block.start)
        data = f.read(block.stop - block.start)
    first = block.lines[0]
    for offset, raw in enumerate(data.split(b"\n")):
        number = first + offset
        if number in wanted:
            rows.append(parse_row(json.loads(raw), f"{name}:{number}", number))
    return rows


def _row_range(parquet_file, start: int, stop: int):
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    import pyarrow as pa

    meta, tables, first = parquet_file.metadata, [], 0
    for group in range(meta.num_row_groups):
        n = meta.row_group(group).num_rows
        if first < stop and first + n > start:
            table = parquet_file.read_row_group(group)
            tables.append(table.slice(max(start - first, 0), min(stop, first + n) - max(start, first)))
        first += n
    return pa.concat_tables(tables)
