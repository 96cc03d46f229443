"""The one definition of every credit / scorer knob: name, type, default, allowed values, help text.

Everything that configures rhythm credit is derived from :data:`KNOBS`:

- :class:`rhythm.ScorerConfig` and :class:`rhythm.integrations.config.RhythmCreditConfig` are dataclasses whose
  knob fields come from here (:func:`knob_dataclass`); every assignment is checked, so a bad value fails on
  construction with an error naming the class, the field and what was expected;
- ``credit_multipliers`` and friends check their arguments with :func:`check`;
- the CLI flags come from :func:`add_arguments`;
- trainer configs take prefixed dataclass fields from :func:`dataclass_fields` (e.g. TRL's ``rhythm_q``) and
  nested mappings (e.g. verl's Hydra keys) go through :func:`from_mapping`, which refuses unknown keys.

Type rules (the same everywhere): ints accept Python and numpy integers (never bools); floats accept ints
and numpy floats (never bools, NaN, or strings); bools accept only ``True`` / ``False`` (numpy bools
too, never 0 / 1). Values are normalised to plain Python types (numpy scalars become int / float, lists
become tuples).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from rhythm_kernels.segments import FLOAT32_MAX, INDEX_LIMIT, is_bool, is_integer, is_real

# The strategies' names; what each reads is rhythm.credit.gamma.STRATEGY_TABLE (checked to agree).
STRATEGIES = ("local", "global", "coupled", "random", "entropy")
SIGNS = ("both", "positive", "negative")
GROUPINGS = ("per_sequence", "fixed")
BACKENDS = ("auto", "triton", "torch", "reference")
CREDIT_PASSES = ("fused", "scorer")
SEED_LIMIT = 2 ** 64          # torch.Generator.manual_seed takes seeds in [0, 2**64)
# gamma is float32 and reaches 1 + (1 + alpha)(gamma_amp - 1) <= 2 gamma_amp - 1: keep it a finite float32.
GAMMA_AMP_MAX = FLOAT32_MAX / 4
# logits / T stays a finite float32 for |logits| < FLOAT32_MAX * T = 3.4e32 at this floor (real logits are < 1e4).
TEMPERATURE_MIN = 1e-6


class ConfigError(ValueError, TypeError):
    """A knob got a value of the wrong type or outside its range. Subclasses both ValueError and TypeError,
    so callers catching either see it. The message names the field and what was expected."""


class _Bad(Exception):
    """Raised by a converter; turned into ConfigError with the field's name by :meth:`Knob.convert`."""


# ---- converters: value -> normalised value, or _Bad -----------------------------------------------------------

def _as_int(x) -> int:
    if not is_integer(x):
        raise _Bad
    return int(x)


def _as_float(x) -> float:
    if not is_real(x):
        raise _Bad
    x = float(x)
    if math.isnan(x):
        raise _Bad
    return x


def integer(low: int | None = None, high: int | None = None) -> Callable:
    """Int in [low, high) (None = unbounded on that side)."""
    def convert(x):
        x = _as_int(x)
        if (low is not None and x < low) or (high is not None and x >= high):
            raise _Bad
        return x
    return convert


def real(low: float, high: float = math.inf, *, low_open=False, high_open=False) -> Callable:
    """Finite float in the interval [low, high] (each end open when asked)."""
    def convert(x):
        x = _as_float(x)
        if not math.isfinite(x) or x < low or x > high or (low_open and x == low) or (high_open and x == high):
            raise _Bad
        return x
    return convert


def one_of(options: tuple[str, ...]) -> Callable:
    def convert(x):
        if not isinstance(x, str) or x not in options:
            raise _Bad
        return x
    return convert


def boolean(x) -> bool:
    if not is_bool(x):
        raise _Bad
    return bool(x)


def optional(inner: Callable) -> Callable:
    return lambda x: None if x is None else inner(x)


def _sequence(x) -> list:
    if isinstance(x, (str, bytes, Mapping)) or not isinstance(x, Iterable):
        raise _Bad
    return list(x)


def horizon(x) -> tuple[int, int | None]:
    """(H_lo, H_hi): H_lo int in [0, 2**62], H_hi None (to the end) or an int in [H_lo, 2**62]; an ordered
    pair (a set has no order)."""
    if isinstance(x, (set, frozenset)):
        raise _Bad
    pair = _sequence(x)
    if len(pair) != 2:
        raise _Bad
    h_lo = integer(0, INDEX_LIMIT + 1)(pair[0])
    h_hi = None if pair[1] is None else integer(h_lo, INDEX_LIMIT + 1)(pair[1])
    return h_lo, h_hi


def layers(x) -> tuple[int, ...] | None:
    """None (the five middle-third layers) or a non-empty set of layer indices >= 0, sorted, duplicates dropped
    (the upper bound is the model's layer count, checked by the scorer)."""
    if x is None:
        return None
    items = [integer(0)(i) for i in _sequence(x)]
    if not items:
        raise _Bad
    return tuple(sorted(set(items)))


# ---- the knobs --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Knob:
    """One setting. ``expected`` completes "must be ..." in errors and help; ``convert`` checks and normalises."""

    name: str
    default: Any
    expected: str
    help: str
    convert: Callable[[Any], Any]
    annotation: str
    choices: tuple[str, ...] | None = None

    def check(self, value, owner: str | None = None, *, display: str | None = None):
        """The normalised value, or ConfigError naming the setting and what was expected.

        The error names ``display`` when given (how the caller's user spells the setting: a CLI flag
        ``--window``, a prefixed field ``GRPOConfig.rhythm_window``), else ``owner.name``, else the name."""
        try:
            return self.convert(value)
        except _Bad:
            where = display or (f"{owner}.{self.name}" if owner else self.name)
            raise ConfigError(f"{where} must be {self.expected}, got {value!r}") from None


def _knobs(*items: Knob) -> dict[str, Knob]:
    return {k.name: k for k in items}


KNOBS: dict[str, Knob] = _knobs(
    Knob("strategy", "coupled", f"one of {STRATEGIES}",
         "credit strategy: coupled (preplan + anchors, the paper's rhythm credit), local (preplan only), global "
         "(anchors only), random / entropy (baselines: ceil(q |R|) random or highest-entropy tokens)",
         one_of(STRATEGIES), "str", STRATEGIES),
    Knob("sign", "both", f"one of {SIGNS}",
         "advantages reshaped: both signs, positive (A >= 0 only, paper v1) or negative (A < 0 only)",
         one_of(SIGNS), "str", SIGNS),
    Knob("q", 0.4, "a number in (0, 1]", "fraction of response tokens selected (count = ceil(q n))",
         real(0.0, 1.0, low_open=True), "float"),
    Knob("gamma_amp", 1.5, f"a finite number in [1, {GAMMA_AMP_MAX:.3g}] (gamma must stay a finite float32)",
         "credit multiplier of selected tokens", real(1.0, GAMMA_AMP_MAX), "float"),
    Knob("alpha", 0.5, "a number in [0, 1]",
         "coupled credit: share of a dominated anchor's extra credit moved to its introducing preplan token",
         real(0.0, 1.0), "float"),
    Knob("k", 3, "an int >= 1", "look-back window (tokens) of locally dominated anchors", integer(1), "int"),
    Knob("seed", 0, "an int in [0, 2**64)", "seed of the random baseline", integer(0, SEED_LIMIT), "int"),
    Knob("window", 10, "an int >= 1 (at most 2**62)", "W of WAAD: attention distances are clipped at W",
         integer(1, INDEX_LIMIT + 1), "int"),
    Knob("horizon", (10, 100), "a pair (H_lo, H_hi): H_lo an int >= 0, H_hi None (to the end) or an int >= H_lo "
         "(both at most 2**62)",
         "FAI horizon: rows t with s + H_lo <= t <= s + H_hi attend to s (both inclusive)",
         horizon, "tuple[int, int | None]"),
    Knob("head_fraction", 0.3, "a number in (0, 1]",
         "size of the local and global head groups as a fraction of the sampled heads (ceil)",
         real(0.0, 1.0, low_open=True), "float"),
    Knob("layers", None, "None or a non-empty list of layer indices >= 0",
         "sampled layer indices (None: the model's five evenly spaced middle-third layers; a hybrid's "
         "softmax-attention layers only, definitions section 3)", layers,
         "tuple[int, ...] | None"),
    Knob("grouping", "per_sequence", f"one of {GROUPINGS}",
         "head groups chosen per sequence, or fixed (computed once from the first batch with a response)",
         one_of(GROUPINGS), "str", GROUPINGS),
    Knob("micro_batch_size", 8, "an int >= 1",
         "sequences per scoring step (one forward over them all when batch_invariant is off; the rows a fixed "
         "grouping is chosen from)", integer(1), "int"),
    Knob("batch_invariant", True, "a bool (True or False)",
         "score each sequence in a forward of its own over exactly its tokens, so its numbers are bitwise the same "
         "whatever else is in the batch, its padding or packing (definitions section 7); off: one forward per "
         "micro-batch (faster for many short rows on a GPU; results then move within section 7's bounds)",
         boolean, "bool"),
    Knob("backend", "auto", f"one of {BACKENDS}",
         "attention_metrics backend (auto: triton on CUDA, torch on CPU)", one_of(BACKENDS), "str", BACKENDS),
    Knob("validate", False, "a bool (True or False)",
         "check q/k/v of every sampled layer for NaN/Inf (one host sync per layer)", boolean, "bool"),
    Knob("temperature", 1.0, f"a finite number > 0, at least {TEMPERATURE_MIN:g} (logits / temperature must stay "
         "finite in float32 for the entropy to be finite)",
         "sampling temperature of the rollouts (the entropy baseline reads softmax(logits / temperature))",
         real(TEMPERATURE_MIN), "float"),
    Knob("credit_pass", "fused", f"one of {CREDIT_PASSES}",
         "trainer adapters: where the metrics are recorded - fused (inside a forward the trainer runs anyway: "
         "no extra forward) or scorer (one extra no-grad early-exit forward per rollout batch)",
         one_of(CREDIT_PASSES), "str", CREDIT_PASSES),
)

# The knobs of the scorer (ScorerConfig, in its field order) and of the trainer adapters (RhythmCreditConfig).
SCORER_KNOBS = ("window", "horizon", "head_fraction", "q", "gamma_amp", "alpha", "k", "seed", "layers", "grouping",
                "micro_batch_size", "batch_invariant", "backend", "validate", "temperature")
CREDIT_KNOBS = ("strategy", "sign", "q", "gamma_amp", "alpha", "k", "seed", "window", "horizon", "head_fraction",
                "layers", "grouping", "micro_batch_size", "backend")
# Options of credit_multipliers / RhythmScores.gamma.
GAMMA_KNOBS = ("q", "gamma_amp", "alpha", "k", "seed")


def check(name: str, value, owner: str | None = None):
    """Check one knob value (normalised result, or ConfigError naming ``owner.name``)."""
    return KNOBS[name].check(value, owner)


def default(name: str):
    return KNOBS[name].default


# ---- dataclasses ------------------------------------------------------------------------------------------------

def knob_dataclass(names: Iterable[str], *, defaults: Mapping[str, Any] | None = None,
                   optional_names: Iterable[str] = ()):
    """Class decorator: add the knobs ``names`` as dataclass fields (annotations, defaults, help in the field
    metadata) ahead of the fields the class declares itself, check every assignment to a knob, and apply
    ``dataclasses.dataclass``. ``defaults`` overrides a default for this class; ``optional_names`` also accept
    None (meaning documented by the class)."""
    names = tuple(names)
    defaults = dict(defaults or {})
    optional_names = set(optional_names)
    unknown = (set(names) | set(defaults) | optional_names) - set(KNOBS)
    if unknown:
        raise KeyError(f"unknown knobs {sorted(unknown)}")

    def wrap(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        annotations = {}
        for name in names:
            knob = KNOBS[name]
            annotations[name] = knob.annotation + (" | None" if name in optional_names else "")
            value = defaults.get(name, knob.default)
            setattr(cls, name, dataclasses.field(default=value, metadata={"help": knob.help, "knob": name}))
        annotations.update(own)
        cls.__annotations__ = annotations
        cls._knob_names = names
        cls._optional_knobs = frozenset(optional_names)
        cls.__setattr__ = _checked_setattr
        return dataclass(cls)

    return wrap


def _checked_setattr(self, name, value):
    cls = type(self)
    if name in cls._knob_names and not (value is None and name in cls._optional_knobs):
        value = KNOBS[name].check(value, cls.__name__)
    object.__setattr__(self, name, value)


def dataclass_fields(names: Iterable[str] = CREDIT_KNOBS, *, prefix: str = "rhythm_",
                     defaults: Mapping[str, Any] | None = None) -> list[tuple[str, str, dataclasses.Field]]:
    """``(prefix + name, annotation, field)`` triples for ``dataclasses.make_dataclass`` (e.g. ``rhythm_q`` fields
    on a trainer's config). The field metadata carries ``help`` (HfArgumentParser's convention) and ``knob``."""
    defaults = dict(defaults or {})
    out = []
    for name in names:
        knob = KNOBS[name]
        out.append((prefix + name, knob.annotation,
                    dataclasses.field(default=defaults.get(name, knob.default),
                                      metadata={"help": f"{knob.help} ({knob.expected})", "knob": name})))
    return out


def from_prefixed(obj, cls, *, prefix: str = "rhythm_"):
    """Build ``cls`` (a knob dataclass) from the ``prefix + name`` attributes of ``obj`` (absent ones keep the
    class default); errors name the prefixed attribute."""
    values = {}
    for name in cls._knob_names:   # in field order: the first bad one is the one cls(**values) would name
        if hasattr(obj, prefix + name):
            value = getattr(obj, prefix + name)
            if not (value is None and name in cls._optional_knobs):
                value = KNOBS[name].check(value, display=f"{type(obj).__name__}.{prefix}{name}")
            values[name] = value
    return cls(**values)


def from_mapping(mapping: Mapping, cls, *, where: str | None = None):
    """Build ``cls`` from a mapping (JSON object, Hydra/OmegaConf node); unknown keys are refused with the
    closest known name. ``where`` names the source in errors (e.g. "rhythm" for a Hydra group)."""
    if not isinstance(mapping, Mapping) and not hasattr(mapping, "items"):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of settings, got {type(mapping).__name__}")
    items = dict(mapping.items())
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in items:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where or cls.__name__} has no setting {key!r}{hint}; known: {', '.join(allowed)}")
    return cls(**items)


# ---- argparse ---------------------------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _text_parser(knob: Knob) -> Callable[[str], Any]:
    """str -> checked value for argparse (``argparse.ArgumentTypeError`` names what was expected)."""
    def parse(text: str):
        try:
            if knob.annotation == "int":
                value = int(text)
            elif knob.annotation == "float":
                value = float(text)
            else:
                value = text
            return knob.convert(value)
        except (ValueError, _Bad):
            raise argparse.ArgumentTypeError(f"must be {knob.expected}, got {text!r}") from None
    return parse


def horizon_from_text(text: str) -> int | None:
    """One horizon bound written as text (a command line, a YAML string): 'end' / 'none' / 'null' (any case)
    -> None (to the end of the sequence), an integer -> int; ValueError otherwise. The one text parser of
    ``horizon`` (the CLI's ``--horizon``, TRL's ``--rhythm_horizon``); the knob's check does the rest."""
    text = text.strip()
    if text.lower() in ("end", "none", "null"):
        return None
    return int(text)


def _horizon_end(text: str):
    try:
        value = horizon_from_text(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int or 'end', got {text!r}") from None
    if value is not None and value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0 or 'end', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str], *,
                  defaults: Mapping[str, Any] | None = None) -> None:
    """Add ``--name-with-dashes`` flags for the knobs ``names``: typed, checked while parsing (a bad value is an
    argparse error), with choices and defaults in ``--help``. Read them back with :func:`from_args`."""
    defaults = dict(defaults or {})
    for name in names:
        knob = KNOBS[name]
        value = defaults.get(name, knob.default)
        shown = "the model's five middle-third layers" if name == "layers" and value is None else value
        help_text = f"{knob.help} (default: {shown})".replace("%", "%%")
        if name == "horizon":
            parser.add_argument(_flag(name), nargs=2, metavar=("H_LO", "H_HI"), type=_horizon_end, default=value,
                                help=f"{help_text}; H_HI 'end' = to the end of the sequence")
        elif name == "layers":
            parser.add_argument(_flag(name), nargs="+", metavar="L", type=_text_parser(
                dataclasses.replace(knob, annotation="int", convert=integer(0), expected="a layer index >= 0")),
                default=value, help=help_text)
        elif knob.annotation == "bool":
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=value, help=help_text)
        else:
            parser.add_argument(_flag(name), type=_text_parser(knob), choices=knob.choices, default=value,
                                metavar=None if knob.choices else name.upper(), help=help_text)


def from_args(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The checked knob values of ``names`` from parsed ``args`` (ConfigError names the flag)."""
    return {name: KNOBS[name].check(getattr(args, name), display=_flag(name)) for name in names}


def describe(names: Iterable[str] = tuple(KNOBS)) -> str:
    """A Markdown table of the knobs (name, default, allowed values, meaning) for the docs."""
    lines = ["| knob | default | allowed | meaning |", "|---|---|---|---|"]
    for name in names:
        knob = KNOBS[name]
        cells = (f"`{name}`", f"`{knob.default!r}`", knob.expected, knob.help)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)
