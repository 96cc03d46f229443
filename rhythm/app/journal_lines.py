"""Journals of complete JSON lines: the resumable files the app appends one record a line to
(``rhythm score``'s ``out.jsonl`` and Parquet journal, ``rhythm probe``'s ``probe_trials.jsonl``).

A writer appends whole lines and fsyncs them, so a killed write can leave only its last line torn. On reading,
:func:`read_complete_lines` repairs that tail in place: a last line without its newline is kept when it is a
complete record (the newline is added) and cut off when it is not (that record is produced again); any other
unreadable line is refused (the file was edited or corrupted). Blank lines are skipped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def json_record(line: bytes, required: tuple[str, ...]) -> dict | None:
    """The JSON object on ``line`` when it is one (UTF-8) holding every key of ``required``; else None."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):   # not UTF-8, not JSON, nested too deep
        return None
    return obj if isinstance(obj, dict) and all(key in obj for key in required) else None


def read_complete_lines(path: Path, required: tuple[str, ...],
                        unreadable: Callable[[int], Exception]) -> list[tuple[int, dict]]:
    """[(1-based line number, record)] of the non-blank lines of the journal ``path`` (an absent file: []),
    after repairing a torn tail in place (see the module docstring; the repair is fsynced). A line that is not
    a complete record (:func:`json_record` with ``required``) raises ``unreadable(line number)``."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        keep = json_record(data[cut:], required) is not None
        with path.open("ab" if keep else "rb+") as f:
            if keep:
                f.write(b"\n")
            else:
                f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        data = data + b"\n" if keep else data[:cut]
    records = []
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        record = json_record(line, required)
        if record is None:
            raise unreadable(number)
        records.append((number, record))
    return records
