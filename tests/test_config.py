"""rhythm.config: one definition of every knob; ScorerConfig / RhythmCreditConfig / argparse flags / prefixed
dataclass fields / mappings all derive from it and refuse bad values on construction, naming the field."""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from rhythm import ScorerConfig, credit_multipliers
from rhythm import config as C
from rhythm.integrations.config import RhythmCreditConfig

BAD = [  # (field, value, words the error must contain)
    ("window", -3, "an int >= 1"), ("window", 0, "an int >= 1"), ("window", 2.0, "an int"),
    ("window", "10", "an int"), ("window", True, "an int"),
    ("horizon", (100, 10), "H_hi None"), ("horizon", (10,), "a pair"), ("horizon", "10,100", "a pair"),
    ("horizon", (-1, None), "H_lo an int >= 0"), ("horizon", (1.5, 10), "a pair"),
    ("q", 0, "(0, 1]"), ("q", 1.5, "(0, 1]"), ("q", float("nan"), "(0, 1]"), ("q", True, "(0, 1]"),
    ("q", "0.4", "(0, 1]"),
    ("gamma_amp", 0.5, "in [1, "), ("gamma_amp", 1e300, "finite float32"), ("gamma_amp", float("inf"), "finite"),
    ("alpha", -0.1, "[0, 1]"), ("alpha", 2, "[0, 1]"),
    ("k", 0, "an int >= 1"), ("k", 2.5, "an int >= 1"), ("k", np.bool_(True), "an int >= 1"),
    ("seed", 2 ** 70, "[0, 2**64)"), ("seed", -1, "[0, 2**64)"), ("seed", 1.0, "an int"),
    ("head_fraction", 2.0, "(0, 1]"), ("head_fraction", 0, "(0, 1]"),
    ("layers", [], "non-empty"), ("layers", [-1, 3], "indices >= 0"), ("layers", 5, "a non-empty list"),
    ("layers", [1.0], "indices"),
    ("grouping", "per_batch", "one of"), ("backend", "tpu", "one of ('auto', 'triton', 'torch', 'reference')"),
    ("micro_batch_size", 0, "an int >= 1"), ("micro_batch_size", True, "an int >= 1"),
]


@pytest.mark.parametrize("cls", [ScorerConfig, RhythmCreditConfig])
@pytest.mark.parametrize("name, value, words", BAD)
def test_bad_values_refused_on_construction(cls, name, value, words):
    if name not in cls._knob_names:
        pytest.skip(f"{cls.__name__} has no {name}")
    with pytest.raises(C.ConfigError) as info:
        cls(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}.{name} must be ") and words in message and repr(value) in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)   # callers may catch either


@pytest.mark.parametrize("name, value", [("validate", 1), ("validate", 0), ("validate", "yes"),
                                         ("temperature", 0), ("temperature", float("inf")),
                                         ("temperature", False)])
def test_scorer_only_knobs(name, value):
    with pytest.raises(C.ConfigError, match=f"ScorerConfig.{name} must be"):
        ScorerConfig(**{name: value})


@pytest.mark.parametrize("name, value", [("strategy", "rhythm"), ("sign", "pos"), ("sign", None)])
def test_credit_only_knobs(name, value):
    with pytest.raises(C.ConfigError, match=f"RhythmCreditConfig.{name} must be one of"):
        RhythmCreditConfig(**{name: value})


def test_numpy_scalars_and_lists_are_normalised():
    cfg = RhythmCreditConfig(k=np.int64(4), window=np.int32(5), q=np.float64(0.5), horizon=[np.int16(3), None],
                             layers=[5, 3, 3], seed=np.uint64(2 ** 63), micro_batch_size=np.int8(2))
    assert (cfg.k, cfg.window, cfg.q, cfg.horizon, cfg.layers, cfg.seed) == (4, 5, 0.5, (3, None), (3, 5), 2 ** 63)
    assert all(type(x) is int for x in (cfg.k, cfg.window, cfg.seed, cfg.micro_batch_size, *cfg.layers))
    assert type(cfg.q) is float and cfg.horizon == (3, None)
    assert ScorerConfig(validate=np.bool_(True)).validate is True


def test_assignment_is_checked_too():
    cfg = ScorerConfig()
    with pytest.raises(C.ConfigError, match=r"ScorerConfig.window must be an int >= 1 \(at most 2\*\*62\), got -3"):
        cfg.window = -3
    assert cfg.window == 10
    with pytest.raises(C.ConfigError, match="ScorerConfig.q"):
        dataclasses.replace(cfg, q=0)


def test_defaults_written_once():
    """Every knob field's default is the one in KNOBS (micro_batch_size: None for the trainer adapters)."""
    for cls, overrides in ((ScorerConfig, {}), (RhythmCreditConfig, {"micro_batch_size": None})):
        for f in dataclasses.fields(cls):
            if f.name in C.KNOBS:
                assert f.default == overrides.get(f.name, C.KNOBS[f.name].default), (cls, f.name)
                assert f.metadata["help"] == C.KNOBS[f.name].help
    assert RhythmCreditConfig(micro_batch_size=None).scorer_kwargs()["micro_batch_size"] == 8
    assert RhythmCreditConfig().scorer_kwargs(4)["micro_batch_size"] == 4
    assert RhythmCreditConfig(micro_batch_size=2).scorer_kwargs(4)["micro_batch_size"] == 2
    scorer_kwargs = RhythmCreditConfig(window=7, horizon=(2, None), q=0.3).scorer_kwargs()
    assert ScorerConfig(**scorer_kwargs).horizon == (2, None) and scorer_kwargs["window"] == 7
    import inspect
    sig = inspect.signature(credit_multipliers).parameters
    assert all(sig[name].default == C.KNOBS[name].default for name in C.GAMMA_KNOBS + ("strategy",))


def test_credit_multipliers_share_the_checks():
    import torch

    mask = torch.ones(1, 4, dtype=torch.bool)
    signal = torch.rand(1, 4)
    for kwargs, words in ((dict(q=0), "q must be a number in (0, 1]"), (dict(seed=2 ** 70), "seed must be an int"),
                          (dict(gamma_amp=1e300), "gamma_amp must be"), (dict(strategy="tpu"), "strategy must be")):
        with pytest.raises(C.ConfigError) as info:
            credit_multipliers(signal, signal, mask, **kwargs)
        assert str(info.value).startswith(words)
    # numpy scalars work where ints/floats do, and give the same gamma
    ref = credit_multipliers(signal, signal, mask, strategy="random", q=0.5, seed=7, k=2)
    got = credit_multipliers(signal, signal, mask, strategy="random", q=np.float64(0.5), seed=np.int64(7),
                             k=np.int32(2))
    assert torch.equal(ref, got)


def test_from_mapping_refuses_unknown_keys():
    cfg = RhythmCreditConfig.from_mapping({"strategy": "local", "horizon": [5, None]})
    assert cfg.strategy == "local" and cfg.horizon == (5, None)
    with pytest.raises(C.ConfigError, match=r"rhythm has no setting 'windwo' \(did you mean 'window'\?\)"):
        RhythmCreditConfig.from_mapping({"windwo": 3}, where="rhythm")
    with pytest.raises(C.ConfigError, match="must be a mapping"):
        RhythmCreditConfig.from_mapping([("q", 0.3)])


def test_prefixed_dataclass_fields():
    base = dataclasses.make_dataclass("Base", [("lr", float, dataclasses.field(default=1e-6))])
    derived = dataclasses.make_dataclass("TrainerConfig", C.dataclass_fields(), bases=(base,))
    obj = derived(rhythm_q=0.2, rhythm_strategy="global", rhythm_micro_batch_size=None)
    assert [f.name for f in dataclasses.fields(derived)][:3] == ["lr", "rhythm_strategy", "rhythm_sign"]
    cfg = C.from_prefixed(obj, RhythmCreditConfig)
    assert (cfg.q, cfg.strategy, cfg.window, cfg.micro_batch_size) == (0.2, "global", 10, None)
    with pytest.raises(C.ConfigError, match=r"^TrainerConfig.rhythm_window must be an int >= 1 \(at most 2\*\*62\), got -3$"):
        C.from_prefixed(derived(rhythm_window=-3), RhythmCreditConfig)


def test_argparse_flags():
    parser = argparse.ArgumentParser(exit_on_error=False)
    C.add_arguments(parser, C.SCORER_KNOBS)
    args = parser.parse_args([])
    assert C.from_args(args, C.SCORER_KNOBS) == {f.name: f.default for f in dataclasses.fields(ScorerConfig)
                                                 if f.name in C.KNOBS}
    args = parser.parse_args(["--window", "4", "--horizon", "2", "end", "--q", "0.25", "--layers", "3", "1",
                              "--backend", "torch", "--validate"])
    values = C.from_args(args, C.SCORER_KNOBS)
    assert (values["window"], values["horizon"], values["q"], values["layers"], values["backend"],
            values["validate"]) == (4, (2, None), 0.25, (1, 3), "torch", True)
    help_text = parser.format_help()
    assert "{auto,triton,torch,reference}" in help_text and "(default: 0.4)" in help_text
    for argv, words in ((["--q", "0"], "--q: must be a number in (0, 1], got '0'"),
                        (["--window", "-3"], "must be an int >= 1"), (["--backend", "tpu"], "backend"),
                        (["--head-fraction", "2"], "(0, 1]"), (["--horizon", "5", "x"], "int or 'end'")):
        with pytest.raises(argparse.ArgumentError) as info:
            parser.parse_args(argv)
        assert words in str(info.value)
    with pytest.raises(C.ConfigError, match=r"--horizon must be a pair"):
        C.from_args(parser.parse_args(["--horizon", "10", "2"]), C.SCORER_KNOBS)


def test_errors_name_the_setting_as_the_caller_spells_it():
    """The display name goes into the check, so the message is built once (no rewriting of another one)."""
    knob = C.KNOBS["head_fraction"]
    with pytest.raises(C.ConfigError, match=r"^--head-fraction must be a number in \(0, 1\], got 2$"):
        knob.check(2, display="--head-fraction")
    with pytest.raises(C.ConfigError, match=r"^ScorerConfig.head_fraction must be"):
        knob.check(2, "ScorerConfig")
    with pytest.raises(C.ConfigError, match=r"^head_fraction must be"):
        knob.check(2)
    args = argparse.Namespace(**{name: C.default(name) for name in C.SCORER_KNOBS})
    args.k = 0
    with pytest.raises(C.ConfigError, match=r"^--k must be an int >= 1, got 0$"):
        C.from_args(args, C.SCORER_KNOBS)
    derived = dataclasses.make_dataclass("Trainer", C.dataclass_fields())
    with pytest.raises(C.ConfigError, match=r"^Trainer.rhythm_micro_batch_size must be an int >= 1, got 0$"):
        C.from_prefixed(derived(rhythm_micro_batch_size=0), RhythmCreditConfig)
    assert C.from_prefixed(derived(rhythm_micro_batch_size=None), RhythmCreditConfig).micro_batch_size is None


def test_describe_lists_every_knob_and_the_docs_are_current():
    from pathlib import Path

    table = C.describe()
    assert all(f"| `{name}` |" in table for name in C.KNOBS)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text(encoding="utf-8")
    assert table in docs, "docs/settings.md: paste the current rhythm.config.describe() table"


def test_one_horizon_text_parser():
    """rhythm.config.horizon_from_text is the one text reading of a horizon bound: the CLI's --horizon and TRL's
    --rhythm_horizon agree on every spelling."""
    pytest.importorskip("trl")
    from rhythm.integrations.trl import _horizon_from_text

    texts = ["10", " 7 ", "end", "END", "none", "null", "0"]
    want = [10, 7, None, None, None, None, 0]
    assert [C.horizon_from_text(t) for t in texts] == want
    assert list(_horizon_from_text(texts)) == want
    parser = argparse.ArgumentParser()
    C.add_arguments(parser, ["horizon"])
    for text, value in zip(texts, want):
        assert parser.parse_args(["--horizon", "0", text]).horizon == [0, value]
    with pytest.raises(ValueError):
        C.horizon_from_text("ten")
