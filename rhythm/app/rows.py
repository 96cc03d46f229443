"""Input rows of ``rhythm score``: read, checked whole before anything expensive, with unambiguous ids.

A row is one JSON object per line with either ``prompt`` and ``response`` (text) or ``prompt_ids`` and
``response_ids`` (lists of token ids), and an optional ``id`` (an int or a string). Every check that needs
only the file runs here, before the tokenizer or the model loads; each failure is a :class:`RowError` whose
message names the line (``rollouts.jsonl:7: ...``).

Ids: either every row has an ``id`` or none has. Without ids a row's id is its 1-based line number (so an
edited input changes them). With ids, all are ints or all are strings (``1`` and ``"1"`` never meet), and
each appears once.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from rhythm_kernels.segments import is_integer


class RowError(ValueError):
    """A bad input row (the message names the source and line)."""


@dataclass
class InputRow:
    line: int                          # 1-based line number in the input
    id: int | str
    prompt: str | None = None          # text rows
    response: str | None = None
    prompt_ids: list[int] | None = None   # token rows
    response_ids: list[int] | None = None
    extra: dict = field(default_factory=dict)   # the row's other keys (e.g. reward, advantage, group)

    @property
    def is_text(self) -> bool:
        return self.prompt is not None


ROW_KEYS = ("id", "prompt", "response", "prompt_ids", "response_ids")
ID_KINDS = ("line", "int", "str")      # how a run's ids were made (stored with the output)


def read_rows(data: bytes, name: str) -> tuple[list[InputRow], str]:
    """All rows of a JSONL input and the kind of their ids ("line", "int" or "str"); RowError on the first
    bad line. Blank lines are skipped (they still count for line numbers); the last line may lack its newline."""
    checker = RowChecker()
    rows = [row for number, raw in enumerate(data.split(b"\n"), start=1)
            if (row := checker.line(raw, name, number)) is not None]
    return rows, checker.finish(name)


def iter_rows(lines: Iterable[bytes], name: str, checker: "RowChecker | None" = None) -> Iterator[InputRow]:
    """The rows of a JSONL input, one at a time (``lines``: the raw lines, e.g. a file opened in binary mode),
    each checked alone and, with ``checker``, against the rows before it; RowError naming ``name:line``."""
    checker = checker or RowChecker(across=False)
    for number, raw in enumerate(lines, start=1):
        row = checker.line(raw[:-1] if raw.endswith(b"\n") else raw, name, number)
        if row is not None:
            yield row


class RowChecker:
    """The row checks of :func:`read_rows`, one row at a time (for streaming readers, and across several files
    of one input): each row well formed, ids present on every row or on none, all of one type, each once.

    ``line(raw, name, number)`` checks one JSONL line (None for a blank one); ``row(obj, name, number)`` one
    decoded object (a Parquet row, say); ``finish(name)`` -> the id kind ("line", "int" or "str")."""

    def __init__(self, *, across: bool = True):
        self.across = across                     # False: each row alone (no checks across rows)
        self.count = 0
        self._with_id: tuple | None = None       # (name, number) of the first row with / without an 'id'
        self._without_id: tuple | None = None
        self._first_of_type: dict[type, tuple] = {}
        self._seen: dict = {}                    # id -> (name, number)

    def line(self, raw: bytes, name: str, number: int) -> InputRow | None:
        where = f"{name}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                           "save the file as UTF-8") from None
        if not text.strip():
            return None
        obj = _decode(text, where)
        if not isinstance(obj, dict):
            raise RowError(f"{where}: expected a JSON object (one row per line), got {_json_kind(obj)}")
        return self.row(obj, name, number)

    def row(self, obj: dict, name: str, number: int) -> InputRow:
        where = f"{name}:{number}"
        row = parse_row(obj, where, number)
        if not self.across:
            return row
        if "id" in obj:
            self._with_id = self._with_id or (name, number)
            kind = type(row.id)
            self._first_of_type.setdefault(kind, (name, number))
            if len(self._first_of_type) > 1:
                other = str if kind is int else int
                raise RowError(f"{where}: id {row.id!r} is {_json_kind(row.id)} but the id on "
                               f"{_at(self._first_of_type[other], name)} is {'a string' if kind is int else 'an int'}; "
                               "use one type for every id (1 and \"1\" would be ambiguous)")
        else:
            self._without_id = self._without_id or (name, number)
        if self._with_id and self._without_id:
            raise RowError(f"{where}: some rows have an 'id' ({_at(self._with_id, name)}) and some do not "
                           f"({_at(self._without_id, name)}); give every row an id, or none (then ids are line "
                           "numbers)")
        if row.id in self._seen:
            raise RowError(f"{where}: duplicate id {row.id!r} (also on {_at(self._seen[row.id], name)}); ids must be "
                           "unique")
        self._seen[row.id] = (name, number)
        self.count += 1
        return row

    @property
    def ids(self):
        """The ids seen so far (a set-like view)."""
        return self._seen.keys()

    @property
    def line_ids(self) -> bool:
        """Rows without an 'id' were seen (their ids are their line numbers)."""
        return self._without_id is not None

    def finish(self, name: str) -> str:
        if not self.count:
            raise RowError(f"{name}: no rows (expected one JSON object per line)")
        return "line" if self._without_id else ("int" if int in self._first_of_type else "str")


def _not_json_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _decode(text: str, where: str):
    """One line's JSON value (strict JSON: no NaN / Infinity); RowError naming the line."""
    try:
        return json.loads(text, parse_constant=_not_json_constant)
    except json.JSONDecodeError as e:
        raise RowError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise RowError(f"{where}: nested too deeply to read (a row is an object of a few levels)") from None
    except ValueError as e:        # NaN / Infinity, or an integer beyond Python's digit limit
        if "digits" in str(e):
            raise RowError(f"{where}: a number with more than {_max_digits()} digits (Python's "
                           "limit for reading integers); use a string for such an id") from None
        raise RowError(f"{where}: not valid JSON ({e})") from None


def _at(place: tuple, name: str) -> str:
    """Where an earlier row is: "line 3" in the same file, "other.jsonl:3" in another one."""
    return f"line {place[1]}" if place[0] == name else f"{place[0]}:{place[1]}"


def parse_row(obj: dict, where: str, number: int) -> InputRow:
    """One row from its decoded JSON object (``where`` names it in errors, ``number`` is its line: the id of a
    row without one). Checks the row alone; the checks across rows (ids) are :class:`RowChecker`'s."""
    row = _parse_fields(obj, where, number)
    row.extra = {key: value for key, value in obj.items() if key not in ROW_KEYS}
    return row


def _parse_fields(obj: dict, where: str, number: int) -> InputRow:
    if "id" in obj:
        row_id = obj["id"]
        if not (is_integer(row_id) or isinstance(row_id, str)):
            raise RowError(f"{where}: 'id' must be an int or a string, got {_json_kind(row_id)} {row_id!r}")
        row_id = row_id if isinstance(row_id, str) else int(row_id)   # a numpy id as the int it holds
    else:
        row_id = number
    has_text = "prompt" in obj or "response" in obj
    has_ids = "prompt_ids" in obj or "response_ids" in obj
    if has_text and has_ids:
        raise RowError(f"{where}: give either 'prompt' and 'response' (text) or 'prompt_ids' and 'response_ids' "
                       "(token ids), not both")
    if has_ids:
        lists = []
        for key in ("prompt_ids", "response_ids"):
            if key not in obj:
                raise RowError(f"{where}: has {'response_ids' if key == 'prompt_ids' else 'prompt_ids'} but no "
                               f"{key!r}")
            lists.append(_token_ids(obj[key], key, where))
        if not lists[0] and not lists[1]:
            raise RowError(f"{where}: empty prompt_ids and response_ids (nothing to score)")
        return InputRow(number, row_id, prompt_ids=lists[0], response_ids=lists[1])
    if has_text:
        texts = []
        for key in ("prompt", "response"):
            if key not in obj:
                raise RowError(f"{where}: has {'response' if key == 'prompt' else 'prompt'} but no {key!r}")
            value = obj[key]
            if not isinstance(value, str):
                raise RowError(f"{where}: {key!r} must be a string, got {_json_kind(value)}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RowError(f"{where}: {key!r} holds a lone surrogate escape (not encodable text)") from None
            texts.append(value)
        if not texts[0] and not texts[1]:
            raise RowError(f"{where}: empty prompt and response (nothing to score)")
        return InputRow(number, row_id, prompt=texts[0], response=texts[1])
    raise RowError(f"{where}: needs 'prompt' and 'response' (text) or 'prompt_ids' and 'response_ids' (token ids); "
                   f"got keys {sorted(obj)}")


def _token_ids(value, key: str, where: str) -> list[int]:
    if not isinstance(value, list):
        raise RowError(f"{where}: {key!r} must be a list of token ids, got {_json_kind(value)}")
    for i, x in enumerate(value):
        if not is_integer(x) or x < 0:
            raise RowError(f"{where}: {key}[{i}] must be a token id (an int >= 0), got {_json_kind(x)} {x!r}")
    return [int(x) for x in value]


def check_vocab(rows: list[InputRow], vocab_size: int, name: str) -> None:
    """Token ids of token rows must lie in [0, vocab_size) (the model's embedding rows)."""
    for row in rows:
        for key in ("prompt_ids", "response_ids"):
            ids = getattr(row, key)
            if ids:
                top = max(ids)
                if top >= vocab_size:
                    i = ids.index(top)
                    raise RowError(f"{name}:{row.line}: {key}[{i}] = {top} is outside the model's vocabulary "
                                   f"[0, {vocab_size})")


_JSON_KINDS = ((bool, "a boolean"), (int, "an int"), (float, "a float"), (str, "a string"), (list, "a list"),
               (dict, "an object"))


def _json_kind(x) -> str:
    """How JSON calls a decoded value ("null", "an int", ...) for error messages (bool before int)."""
    if x is None:
        return "null"
    return next((name for kind, name in _JSON_KINDS if isinstance(x, kind)), type(x).__name__)


def _max_digits() -> int:
    """Python's limit on the digits of an integer read from text (3.11+; 4300 by default)."""
    return getattr(sys, "get_int_max_str_digits", lambda: 4300)()
