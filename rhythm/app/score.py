"""The score job: rollouts -> per-token signals and gammas, one output row per input row.

Python API (what ``rhythm score`` runs, and what another process can call per micro-batch)::

    settings = ScoreSettings(model="path/to/model", strategies=("coupled", "random"),
                             scorer=ScorerConfig(micro_batch_size=4))
    job = ScoreJob(settings)
    pairs = job.tokenize(rows, "rollouts.jsonl")   # cheap checks, before the weights load (RowError)
    out = job.score_rows(rows)                      # loads the model once; [dict] in the order of rows

``rows`` are :class:`rhythm.app.rows.InputRow` (from :func:`rhythm.app.rows.read_rows` or
:func:`rhythm.app.rows.parse_row`). ``score_rows`` scores them in micro-batches of
``settings.scorer.micro_batch_size`` consecutive rows. With ``batch_invariant`` (the default) each row runs in a
forward of its own, so its values depend only on the settings and its tokens, bit for bit (and its random
baseline only on the seed and its id), except a fixed grouping's head groups, chosen from the first micro-batch;
calling ``score_rows`` once per micro-batch gives the rows of one call on the whole list.

Output row: ``id``, ``prompt_length``, ``response_ids``, ``waad``, ``fai``, ``fai_valid`` and one
``gamma_<strategy>`` per strategy, every list over the response tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from rhythm import config as knobs
from rhythm.app.common import DEFAULT_STRATEGIES, Console, ModelSource, chat_ids, pad_id, trainer_batch
from rhythm.app.rows import InputRow, RowError, check_vocab
from rhythm.scoring.scorer import ScorerConfig


@dataclass(frozen=True)
class ScoreSettings:
    """Everything a score job needs (picklable: a worker process can rebuild the job from it).

    model: a local model directory or .gguf file (None: the bundled SmolLM2). device: torch device (None: CPU).
    dtype: "auto" (the checkpoint's) or a torch dtype name. strategies: the gamma columns written.
    chat_template: text prompts go through the tokenizer's chat template as one user message.
    scorer: the :class:`rhythm.ScorerConfig` (window, horizon, q, seed, micro_batch_size, ...).
    keep: the input row's other fields copied into its output row (after the computed columns): None = all
    of them, or these names (in this order; a row without one of them just lacks it).
    """

    model: str | None = None
    device: str | None = None
    dtype: str = "auto"
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    chat_template: bool = True
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    keep: tuple[str, ...] | None = None

    def __post_init__(self):
        bad = [s for s in self.strategies if s not in knobs.STRATEGIES]
        if not self.strategies or bad:
            raise knobs.ConfigError(f"ScoreSettings.strategies must be a non-empty list of {knobs.STRATEGIES}, "
                                    f"got {self.strategies!r}")
        object.__setattr__(self, "strategies", tuple(dict.fromkeys(self.strategies)))
        if self.keep is not None:
            if isinstance(self.keep, str) or not all(isinstance(k, str) and k for k in self.keep):
                raise knobs.ConfigError(f"ScoreSettings.keep must be None or a list of field names, got "
                                        f"{self.keep!r}")
            object.__setattr__(self, "keep", tuple(dict.fromkeys(self.keep)))
        if not isinstance(self.scorer, ScorerConfig):
            raise knobs.ConfigError(f"ScoreSettings.scorer must be a rhythm.ScorerConfig, got "
                                    f"{type(self.scorer).__name__}")

    def scorer_knobs(self) -> dict:
        """The scorer's knob values, in ScorerConfig's order (the RhythmScorer's keyword arguments)."""
        return {name: getattr(self.scorer, name) for name in knobs.SCORER_KNOBS}

    def columns(self) -> tuple[str, ...]:
        """The names of the computed columns of an output row."""
        return ("id", "prompt_length", "response_ids", "waad", "fai", "fai_valid",
                *(f"gamma_{s}" for s in self.strategies))

    def record(self, id_kind: str, model_id: str | None = None, kept: dict | None = None, *,
               parquet: bool = False) -> dict:
        """Everything that changes a number or a column of the output (stored with it; a resume must match),
        as JSON values. ``model_id``: the resolved checkpoint path (default: resolved from ``model``).
        ``kept``: the input fields the rows keep, name -> Parquet kind (rhythm.app.output.keep_type); stored
        as "keep" (and "keep_types" for a Parquet output, ``parquet``) only when there is one."""
        stored = {"model": model_id or ModelSource(self.model).model_id(), "dtype": self.dtype, "ids": id_kind,
                  "strategies": list(self.strategies), "chat_template": self.chat_template}
        stored.update(self.scorer_knobs())
        if stored["grouping"] != "fixed" and stored["batch_invariant"]:
            del stored["micro_batch_size"]   # a row's numbers do not depend on how rows are batched
        if kept:
            stored["keep"] = list(kept)
            if parquet:
                stored["keep_types"] = dict(kept)
        return json.loads(json.dumps(stored))    # tuples -> lists, as stored

    def kept(self, row: InputRow, name: str = "<rows>") -> dict:
        """The input fields ``row``'s output row keeps (see ``keep``); RowError when one has the name of a
        computed column."""
        kept = dict(row.extra) if self.keep is None else {k: row.extra[k] for k in self.keep if k in row.extra}
        clash = [k for k in kept if k in self.columns()]
        if clash:
            raise RowError(f"{name}:{row.line}: field {clash[0]!r} has the name of an output column; rename it, or "
                           "keep the other fields with --keep a,b (or --keep none)")
        return kept


def _score_batch(scorer, chunk, pairs, pad: int, strategies) -> list[dict]:
    """Score one micro-batch in the trainer layout (prompt left-padded, response right-padded) -> output rows."""
    from rhythm.scoring.scorer import to_response_tensor

    ids, mask, response = trainer_batch(pairs, pad)
    r_len = max(len(r) for _, r in pairs)
    scores = scorer.score(ids, mask, response, with_entropy="entropy" in strategies)
    columns = {"waad": scores.waad, "fai": scores.fai, "fai_valid": scores.fai_valid}
    # random: each row drawn from sha256(seed, its id), so batching and resumes cannot change it
    ids = [row.id for row in chunk]
    columns.update({f"gamma_{s}": scores.gamma(s, row_ids=ids)        # gamma_random last, as rows always had it
                    for s in sorted(strategies, key=lambda s: s == "random")})
    columns = {key: to_response_tensor(x, r_len, response) for key, x in columns.items()}
    out = []
    for i, (row, (p, r)) in enumerate(zip(chunk, pairs)):
        item = {"id": row.id, "prompt_length": len(p), "response_ids": list(r)}
        item.update({key: x[i, : len(r)].tolist() for key, x in columns.items()})
        out.append(item)
    return out


def tokenize_rows(rows: list[InputRow], tokenizer, use_template: bool, name: str):
    """[(prompt_ids, response_ids)] per row: token rows as given; text rows with the prompt as one user message
    through the chat template (as ``rhythm analyze`` does) when the tokenizer has one and use_template."""
    template = use_template and bool(getattr(tokenizer, "chat_template", None))
    pairs = []
    for row in rows:
        if not row.is_text:
            pairs.append((row.prompt_ids, row.response_ids))
            continue
        if template:
            prompt = chat_ids(tokenizer, row.prompt)[0].tolist()
        else:
            prompt = tokenizer(row.prompt, add_special_tokens=True).input_ids
        response = tokenizer(row.response, add_special_tokens=False).input_ids
        if not prompt and not response:
            raise RowError(f"{name}:{row.line}: prompt and response tokenize to no tokens (nothing to score)")
        pairs.append((list(prompt), list(response)))
    return pairs


def check_rows_fit(rows, pairs, vocab_size, max_positions, name: str) -> None:
    """Token ids inside [0, vocab_size) and every row within the model's positions (None: not checked)."""
    if vocab_size:
        check_vocab([r for r in rows if not r.is_text], int(vocab_size), name)
    if max_positions:
        for row, (p, r) in zip(rows, pairs):
            if len(p) + len(r) > max_positions:
                raise RowError(f"{name}:{row.line}: {len(p)} prompt + {len(r)} response tokens exceed the model's "
                               f"max_position_embeddings = {max_positions}")


class ScoreJob:
    """A score job for one settings object: the tokenizer and the model load once, on first use.

    ``tokenize(rows, name)`` -> [(prompt_ids, response_ids)]: tokenizes and checks the rows against the
    model's config (vocabulary, positions) without loading the weights (RowError naming ``name:line``).
    ``score_rows(rows, name)`` -> output rows (loads the model on the first call).
    """

    def __init__(self, settings: ScoreSettings, *, console: Console | None = None,
                 source: ModelSource | None = None):
        self.settings = settings
        self.console = console or Console(quiet=True)
        self.source = source or ModelSource(settings.model, self.console)
        self._tokenizer = None
        self.model = None
        self.scorer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.source.load_tokenizer()
        return self._tokenizer

    def tokenize(self, rows: list[InputRow], name: str = "<rows>"):
        pairs = tokenize_rows(rows, self.tokenizer, self.settings.chat_template, name)
        check_rows_fit(rows, pairs, *self.source.limits(), name)
        return pairs

    def load(self) -> None:
        """Load the model and build the scorer (once)."""
        if self.model is not None:
            return
        from rhythm.scoring.scorer import RhythmScorer

        self.model, self._tokenizer = self.source.load(device=self.settings.device, dtype=self.settings.dtype,
                                                       tokenizer=self._tokenizer)
        self.scorer = RhythmScorer(self.model, **self.settings.scorer_knobs())

    def check_embeddings(self, rows: list[InputRow], name: str) -> None:
        """The token ids of ``rows`` against the loaded model, the final word on the vocabulary (its
        embedding rows)."""
        check_vocab([r for r in rows if not r.is_text], self.model.get_input_embeddings().num_embeddings, name)

    def score_rows(self, rows: list[InputRow], name: str = "<rows>", *, pairs=None) -> list[dict]:
        """Output rows of ``rows`` (in their order), scored in micro-batches of consecutive rows.
        ``pairs``: their tokens from :meth:`tokenize` (default: tokenized and checked here)."""
        if pairs is None:
            pairs = self.tokenize(rows, name)
        self.load()
        self.check_embeddings(rows, name)
        pad = pad_id(self.tokenizer)
        size = self.scorer.config.micro_batch_size
        out = []
        for first in range(0, len(rows), size):
            out += _score_batch(self.scorer, rows[first:first + size], pairs[first:first + size], pad,
                                self.settings.strategies)
        for row, item in zip(rows, out):
            item.update(self.settings.kept(row, name))
        return out


def check_parquet_ids(rows, name: str) -> None:
    """Parquet stores integer ids as int64: refuse any outside it before scoring (not after, at the write)."""
    from rhythm.app.common import UsageError

    for row in rows:
        if isinstance(row.id, int) and not -(1 << 63) <= row.id < (1 << 63):
            raise UsageError(f"{name}:{row.line}: id {row.id} does not fit Parquet's int64 ids; "
                             "use string ids or write .jsonl")


class KeptFields:
    """The input fields the output rows keep (``settings.keep``) and their Parquet column kinds, gathered over a
    whole input in its checking pass: ``add(rows, name)`` per batch, then ``types(name)`` -> {field: kind}
    (in ``settings.keep``'s order, else in order of first appearance), the ``kept`` of ``settings.record``."""

    def __init__(self, settings: ScoreSettings):
        self.settings = settings
        self.kinds: dict[str, set] = {}

    def add(self, rows: list[InputRow], name: str) -> None:
        from rhythm.app.output import value_kind

        for row in rows:
            for key, value in self.settings.kept(row, name).items():
                self.kinds.setdefault(key, set()).add(value_kind(value))

    def types(self, name: str) -> dict:
        from rhythm.app.common import UsageError
        from rhythm.app.output import keep_type

        missing = [key for key in self.settings.keep or () if key not in self.kinds]
        if missing:
            raise UsageError(f"--keep: no row of {name} has a field {missing[0]!r}"
                             + (f" (its fields beside the row's own: {', '.join(self.kinds)})" if self.kinds else ""))
        order = self.settings.keep if self.settings.keep is not None else tuple(self.kinds)
        return {key: keep_type(self.kinds[key] - {None}) for key in order}
