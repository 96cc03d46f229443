"""The probe's journal ``DIR/probe_trials.jsonl``: one JSON record per prompt, appended and fsynced as each
group of prompts finishes, so an interrupted run loses at most the group it was running.

Resume: the settings are stored next to the journal (``probe_trials.jsonl.settings.json``) and a resume
must match them (the rule of ``rhythm score``, :func:`rhythm.app.output.check_stored_settings`). The journal is
read as ``rhythm score``'s (:func:`rhythm.app.journal_lines.read_complete_lines`): a last line without its
newline is kept when it is a complete record and cut off when it is torn (a killed write: that prompt runs
again); any other unreadable line is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rhythm.app.journal_lines import read_complete_lines

RECORD_KEYS = ("id", "prompt")     # a line of the journal holding these is a complete probe record


class ProbeError(ValueError):
    """A probe that cannot run or resume (the message says why and what to do)."""


class Journal:
    """``records``: id -> record of the prompts already probed."""

    def __init__(self, path: Path, settings: dict):
        from rhythm.app.output import OutputError, check_stored_settings

        self.path = Path(path)
        try:
            check_stored_settings(self.path, settings, has_rows=self.path.exists() and self.path.stat().st_size > 0,
                                  flag="--out", tool="rhythm probe")
        except OutputError as e:
            raise ProbeError(f"--out: {e}") from None
        self.records: dict = {}
        for number, record in read_complete_lines(self.path, RECORD_KEYS, lambda number: ProbeError(
                f"{self.path}:{number}: not a complete probe record (the file was edited or corrupted); delete "
                "that line or the file, or choose another --out")):
            self.records[record["id"]] = record

    def append(self, records: list[dict]) -> None:
        """Write finished records (one JSON line each) and make them durable before returning."""
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.records.update({r["id"]: r for r in records})
