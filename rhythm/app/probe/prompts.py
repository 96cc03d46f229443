"""Prompts of ``rhythm probe``: the built-in grade-school math set and the user's own files.

``--prompts builtin`` (the default) is :data:`BUILTIN`, 32 problems written for this project (none copied
from a benchmark), each a different situation and set of numbers. A user's own prompts come from a file:

- ``.jsonl``: one JSON object per line with ``"prompt"`` (a non-empty string) and optionally ``"id"`` (an
  int or a string; all lines with one or none, each id once). Without ids a prompt's id is its line number.
  Other keys are ignored. Blank lines are skipped.
- ``.txt``: one prompt per non-empty line (ids are the line numbers).

Each prompt becomes one user message through the tokenizer's chat template (unless ``--no-chat-template``).
Errors name the file and line (:class:`PromptError`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rhythm_kernels.segments import is_integer

SUFFIX = " Think step by step."

_PROBLEMS = [
    "Maya has 14 stickers. She buys 3 packs with 6 stickers each and gives 9 stickers to her brother. How many stickers does she have now?",
    "A baker makes 120 muffins. He sells 45 in the morning and half of the rest in the afternoon. How many muffins are left?",
    "Tom reads 12 pages of his book every day. The book has 180 pages. After 9 days, how many pages does he still have to read?",
    "A school bus holds 42 students. How many buses are needed to take 235 students on a trip?",
    "Lena saves 8 dollars each week. Her bike costs 150 dollars and she already has 38 dollars. How many weeks must she save to buy the bike?",
    "A garden has 7 rows of tomato plants with 13 plants in each row. Rabbits eat 15 plants. How many plants are left?",
    "A train travels 64 kilometres per hour. How far does it travel in 3 and a half hours?",
    "Sam buys 4 notebooks at 2.50 dollars each and a pen for 1.75 dollars. He pays with a 20 dollar bill. How much change does he get?",
    "A farmer has 36 cows and twice as many sheep. He sells a quarter of the sheep. How many animals does he have now?",
    "A rectangle is 17 centimetres long and 9 centimetres wide. What is its perimeter?",
    "Priya runs 2.4 kilometres on Monday, 3.1 kilometres on Wednesday and 4.5 kilometres on Friday. How far does she run that week?",
    "A box holds 24 crayons. A class of 27 children needs 5 crayons each. How many boxes must the teacher open?",
    "Jamal is 3 times as old as his sister. In 4 years he will be 25. How old is his sister now?",
    "A pizza is cut into 8 slices. Five friends each eat 3 slices. How many pizzas did they need at least?",
    "A shop sells pencils in packs of 12 for 3 dollars. How much do 60 pencils cost?",
    "The temperature was 5 degrees at 6 am and rose by 3 degrees every hour. What was it at 11 am?",
    "Ana has 250 grams of flour. A cake needs 180 grams and cookies need 95 grams. How many more grams of flour does she need to make both?",
    "A parking lot has 6 levels with 48 spaces on each level. 197 cars are parked. How many spaces are free?",
    "Leo scored 78, 85 and 92 on three tests. What score does he need on the fourth test to average 86?",
    "A water tank holds 500 litres. It leaks 12 litres an hour. How much water is left after a day and a half?",
    "A library had 1,240 books. It gave away 315 and bought 180 new ones. How many books does it have now?",
    "Grace plants 5 flowers in the first row, 8 in the second, 11 in the third, and keeps adding 3 per row. How many flowers are in the sixth row?",
    "A movie starts at 7:45 pm and lasts 2 hours and 25 minutes. At what time does it end?",
    "Omar buys a jacket that costs 80 dollars with a 25 percent discount. How much does he pay?",
    "There are 3 red marbles for every 5 blue marbles in a jar. The jar has 40 marbles. How many are red?",
    "A cyclist rides 15 kilometres in 45 minutes. At that speed, how far does she ride in 2 hours?",
    "Nina's class collects 6 bags of cans a week for 7 weeks. Each bag holds 32 cans. How many cans do they collect?",
    "A recipe for 4 people uses 300 grams of rice. How much rice is needed for 10 people?",
    "Ben has 9 ten-dollar bills and 14 one-dollar coins. He spends 57 dollars. How much money does he have left?",
    "A square field has sides of 25 metres. A fence costs 4 dollars per metre. How much does it cost to fence the field?",
    "Kira walks her dog 35 minutes every morning and 20 minutes every evening. How many hours does she walk the dog in two weeks?",
    "A factory packs 144 bottles into crates of 18. Each crate sells for 27 dollars. How much money do all the crates bring?",
]


@dataclass(frozen=True)
class Prompt:
    id: int | str
    text: str


class PromptError(ValueError):
    """A bad prompts file or argument (the message names it)."""


BUILTIN = tuple(Prompt(f"gsm{i + 1:02d}", text + SUFFIX) for i, text in enumerate(_PROBLEMS))


def load_prompts(source: str) -> tuple[list[Prompt], str]:
    """(prompts, a description of their source) from ``"builtin"`` or a .jsonl / .txt file path."""
    if source == "builtin":
        return list(BUILTIN), f"builtin ({len(BUILTIN)} grade-school math problems)"
    path = Path(source)
    if not path.is_file():
        raise PromptError(f"--prompts {source!r} is neither 'builtin' nor an existing file")
    if path.suffix not in (".jsonl", ".txt"):
        raise PromptError(f"--prompts {path}: expected a .jsonl or .txt file (docs/probe.md), got {path.suffix or 'no suffix'!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"--prompts {path}: not valid UTF-8 (byte {e.start})") from None
    prompts = _from_jsonl(text, str(path)) if path.suffix == ".jsonl" else _from_txt(text)
    if not prompts:
        raise PromptError(f"--prompts {path} holds no prompt")
    return prompts, str(path.resolve())


def _from_txt(text: str) -> list[Prompt]:
    return [Prompt(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _from_jsonl(text: str, name: str) -> list[Prompt]:
    prompts: list[Prompt] = []
    seen: dict = {}
    explicit = None       # whether the lines carry ids (all or none)
    id_type = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise PromptError(f"{where}: not a JSON object") from None
        if not isinstance(obj, dict):
            raise PromptError(f"{where}: expected a JSON object with a 'prompt', got {type(obj).__name__}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"{where}: 'prompt' must be a non-empty string")
        has_id = "id" in obj
        if explicit is None:
            explicit = has_id
        elif explicit != has_id:
            raise PromptError(f"{where}: either every line has an 'id' or none has")
        pid = obj["id"] if has_id else number
        if not (is_integer(pid) or isinstance(pid, str)):
            raise PromptError(f"{where}: 'id' must be an int or a string, got {type(pid).__name__}")
        pid = pid if isinstance(pid, str) else int(pid)
        if has_id:
            if id_type is None:
                id_type = type(pid)
            elif type(pid) is not id_type:
                raise PromptError(f"{where}: ids must all be ints or all strings")
        if pid in seen:
            raise PromptError(f"{where}: id {pid!r} already used on line {seen[pid]}")
        seen[pid] = number
        prompts.append(Prompt(pid, prompt))
    return prompts
