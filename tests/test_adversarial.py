"""An adversarial pass over the public entry points, as a careful user with unusual data would try them.

Two kinds of cases:
- bad input: the call raises ValueError / TypeError whose message names the argument, raised from the
  package's own argument checks (the innermost frame is in rhythm/ or the kernels package, never deep inside
  torch or transformers);
- unusual but valid input: the result equals the one for the ordinary spelling of the same input (numpy
  scalars, narrow integer dtypes, NaN where a position is never read, empty axes).
(Row handling of ``rhythm score``, where the same rules hold per line, is in tests/test_score_cli.py.)
"""
from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import rhythm
from rhythm import (RhythmScorer, ScorerConfig, attention_metrics, credit_multipliers, entropy_selection,
                    head_to_layer, random_selection, rhythm_selection, sample_layers, select_head_groups,
                    shape_advantages, token_signals, top_q_mask, trainer_response_mask)
from rhythm.integrations.config import RhythmCreditConfig
from rhythm_kernels.segments import Segments

CPU = torch.device("cpu")

PACKAGE_DIRS = (Path(rhythm.__file__).resolve().parent, Path(__file__).resolve().parents[1] / "kernels")


def _signals(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    waad = torch.rand(batch, length, generator=g) * 10
    fai = torch.rand(batch, length, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, 4:] = True
    valid = mask.clone()
    valid[:, -3:] = False
    return waad, fai, mask, valid


@pytest.fixture(scope="module")
def tiny_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


# ---- bad input: a clear error naming the argument, from the package's own checks --------------------------------

W, F, M, V = _signals()
ONES = torch.ones(2, 12)
BAD_CALLS = {
    # credit_multipliers
    "q=0": (lambda: credit_multipliers(W, F, M, q=0), "q"),
    "q=True": (lambda: credit_multipliers(W, F, M, q=True), "q"),
    "q='0.4'": (lambda: credit_multipliers(W, F, M, q="0.4"), "q"),
    "q=nan": (lambda: credit_multipliers(W, F, M, q=math.nan), "q"),
    "gamma_amp=1e300": (lambda: credit_multipliers(W, F, M, gamma_amp=1e300), "gamma_amp"),
    "gamma_amp=0.5": (lambda: credit_multipliers(W, F, M, gamma_amp=0.5), "gamma_amp"),
    "alpha=2": (lambda: credit_multipliers(W, F, M, alpha=2), "alpha"),
    "k=0": (lambda: credit_multipliers(W, F, M, k=0), "k"),
    "k=1.5": (lambda: credit_multipliers(W, F, M, k=1.5), "k"),
    "seed=2**70": (lambda: credit_multipliers(W, F, M, strategy="random", seed=2 ** 70), "seed"),
    "seed=-1": (lambda: credit_multipliers(W, F, M, strategy="random", seed=-1), "seed"),
    "strategy=tpu": (lambda: credit_multipliers(W, F, M, strategy="tpu"), "strategy"),
    "mask float": (lambda: credit_multipliers(W, F, M.float()), "response_mask"),
    "mask shape": (lambda: credit_multipliers(W, F, M[:, :5]), "shape of response_mask"),
    "waad int": (lambda: credit_multipliers(W.long(), F, M), "waad"),
    "waad nan on response": (lambda: credit_multipliers(torch.where(M, math.nan, W), F, M), "waad"),
    "fai nan where valid": (lambda: credit_multipliers(W, torch.where(V, math.nan, F), M, fai_valid=V), "fai"),
    "fai_valid int": (lambda: credit_multipliers(W, F, M, fai_valid=V.int()), "fai_valid"),
    "entropy missing": (lambda: credit_multipliers(W, F, M, strategy="entropy"), "entropy"),
    "waad None for coupled": (lambda: credit_multipliers(None, F, M), "waad"),
    "mask two runs": (lambda: credit_multipliers(W, F, M & (torch.arange(12) != 7)), "contiguous"),
    "mask list": (lambda: credit_multipliers(W, F, M.tolist()), "response_mask"),
    # selection
    "rhythm_selection q": (lambda: rhythm_selection(W, F, M, V, q=1.5), "q"),
    "random_selection seed": (lambda: random_selection(M, seed=1.0), "seed"),
    "entropy_selection nan": (lambda: entropy_selection(torch.where(M, math.nan, W), M), "entropy"),
    # shape_advantages
    "gamma nan": (lambda: shape_advantages(ONES, torch.full((2, 12), math.nan)), "gamma"),
    "gamma negative": (lambda: shape_advantages(ONES, -ONES), "gamma"),
    "gamma inf": (lambda: shape_advantages(ONES, torch.full((2, 12), math.inf)), "gamma"),
    "sign": (lambda: shape_advantages(ONES, ONES, sign="pos"), "sign"),
    "advantages shape": (lambda: shape_advantages(torch.ones(3), ONES), "advantages"),
    "gamma int": (lambda: shape_advantages(ONES, ONES.long()), "gamma"),
    # configs
    "ScorerConfig window=-3": (lambda: ScorerConfig(window=-3), "ScorerConfig.window"),
    "ScorerConfig horizon=(100, 10)": (lambda: ScorerConfig(horizon=(100, 10)), "ScorerConfig.horizon"),
    "ScorerConfig validate=1": (lambda: ScorerConfig(validate=1), "ScorerConfig.validate"),
    "ScorerConfig fixed_groups": (lambda: ScorerConfig(fixed_groups="abc"), "ScorerConfig.fixed_groups"),
    "Credit q=0": (lambda: RhythmCreditConfig(q=0), "RhythmCreditConfig.q"),
    "Credit backend=tpu": (lambda: RhythmCreditConfig(backend="tpu"), "RhythmCreditConfig.backend"),
    "Credit head_fraction=2": (lambda: RhythmCreditConfig(head_fraction=2.0), "RhythmCreditConfig.head_fraction"),
    "Credit gamma_amp=1e300": (lambda: RhythmCreditConfig(gamma_amp=1e300), "RhythmCreditConfig.gamma_amp"),
    "Credit unknown key": (lambda: RhythmCreditConfig.from_mapping({"qq": 1}), "qq"),
    "Credit micro_batch_size=0": (lambda: RhythmCreditConfig(micro_batch_size=0),
                                  "RhythmCreditConfig.micro_batch_size"),
    "credit_kwargs seed": (lambda: RhythmCreditConfig().credit_kwargs(seed=2 ** 70), "seed"),
    # attention_metrics
    "metrics window=-3": (lambda: attention_metrics(torch.rand(1, 2, 8, 4), torch.rand(1, 1, 8, 4), window=-3),
                          "window"),
    "metrics horizon": (lambda: attention_metrics(torch.rand(1, 2, 8, 4), torch.rand(1, 1, 8, 4),
                                                  horizon=(100, 10)), "horizon"),
    "metrics backend": (lambda: attention_metrics(torch.rand(1, 2, 8, 4), torch.rand(1, 1, 8, 4), backend="tpu"),
                        "backend"),
    "metrics q rank 3": (lambda: attention_metrics(torch.rand(2, 8, 4), torch.rand(2, 8, 4)), "q"),
    "metrics GQA": (lambda: attention_metrics(torch.rand(1, 3, 8, 4), torch.rand(1, 2, 8, 4)), "heads"),
    # issue 19 item 9: overflow in the advantages' dtype; a layout leaving a batch row without a sequence
    "shape_advantages fp16 overflow": (lambda: shape_advantages(torch.full((2, 12), 6e4, dtype=torch.float16),
                                                                torch.full((2, 12), 2.0)), "overflows torch.float16"),
    "segments leave a row": (lambda: attention_metrics(torch.rand(2, 2, 8, 4), torch.rand(2, 1, 8, 4),
                                                       segments=Segments.from_spans([(0, 0, 8, 0)], (2, 8), CPU)),
                             "without a sequence"),
    # issue 19 item 10: the other public entry points check their arguments too
    "top_q_mask q=0": (lambda: top_q_mask(W, M, 0), "q must be"),
    "top_q_mask q=2": (lambda: top_q_mask(W, M, 2), "q must be"),
    "top_q_mask q=nan": (lambda: top_q_mask(W, M, math.nan), "q must be"),
    "top_q_mask nan scores": (lambda: top_q_mask(torch.where(M, math.nan, W), M, 0.4), "scores"),
    "top_q_mask eligible float": (lambda: top_q_mask(W, M.float(), 0.4), "eligible"),
    "rhythm_selection validate='yes'": (lambda: rhythm_selection(W, F, M, V, validate="yes"), "validate"),
    "select_head_groups nan": (lambda: select_head_groups(torch.tensor([[1.0, math.nan, 2.0]])), "d holds NaN"),
    "select_head_groups fraction": (lambda: select_head_groups(torch.rand(1, 4), 1.5), "fraction"),
    "token_signals groups": (lambda: token_signals(torch.rand(1, 4, 6), torch.rand(1, 4, 6), "groups"), "groups"),
    "token_signals head 9 of 4": (lambda: token_signals(torch.rand(1, 4, 6), torch.rand(1, 4, 6), rhythm.HeadGroups(
        torch.tensor([[9]]), torch.tensor([[0]]))), "head index 9"),
    "head_to_layer float": (lambda: head_to_layer(torch.tensor([1.5]), 4), "index"),
    "head_to_layer heads_per_layer": (lambda: head_to_layer(3, np.float64(4)), "heads_per_layer"),
    "sample_layers 2.5": (lambda: sample_layers(2.5), "num_layers"),
    "trainer_response_mask True": (lambda: trainer_response_mask(M, True), "response_length"),
    "trainer_response_mask 2.5": (lambda: trainer_response_mask(M, 2.5), "response_length"),
    "trainer_response_mask list": (lambda: trainer_response_mask(M.tolist(), 2), "attention_mask"),
    "metrics validate='yes'": (lambda: attention_metrics(torch.rand(1, 2, 8, 4), torch.rand(1, 1, 8, 4),
                                                         validate="yes"), "validate"),
    "ScorerConfig horizon={1, 2}": (lambda: ScorerConfig(horizon={1, 2}), "ScorerConfig.horizon"),
    "metrics window=2**70": (lambda: attention_metrics(torch.rand(1, 2, 8, 4), torch.rand(1, 1, 8, 4),
                                                       window=2 ** 70), "window"),
    "metrics horizon 2**70": (lambda: attention_metrics(torch.rand(1, 2, 8, 4), torch.rand(1, 1, 8, 4),
                                                        horizon=(0, 2 ** 70)), "horizon"),
    "LayerAttention sliding_window=2**70": (lambda: rhythm.LayerAttention(sliding_window=2 ** 70), "sliding_window"),
    "LayerAttention chunk_size=2**70": (lambda: rhythm.LayerAttention(chunk_size=2 ** 70), "chunk_size"),
    "LayerAttention softcap=1e-320": (lambda: rhythm.LayerAttention(softcap=1e-320), "softcap"),
    "metrics scale=1e-320": (lambda: attention_metrics(torch.rand(1, 2, 8, 4), torch.rand(1, 1, 8, 4),
                                                       scale=1e-320), "scale"),
    "Credit window=2**70": (lambda: RhythmCreditConfig(window=2 ** 70), "RhythmCreditConfig.window"),
}


def _assert_clear(error: BaseException, words: str):
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    assert words in str(error), str(error)
    innermost = Path(traceback.extract_tb(error.__traceback__)[-1].filename).resolve()
    assert any(d in innermost.parents for d in PACKAGE_DIRS), f"raised deep inside {innermost}: {error}"


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_is_refused_clearly(name):
    call, words = BAD_CALLS[name]
    with pytest.raises(Exception) as info:
        call()
    _assert_clear(info.value, words)


SCORER_BAD = {
    "input_ids float": (lambda s, ids, r: s.score(ids.float(), None, r), "input_ids"),
    "input_ids 1-D": (lambda s, ids, r: s.score(ids[0], None, r[0]), "input_ids"),
    "token id out of vocabulary": (lambda s, ids, r: s.score(ids + 64, None, r), "input_ids"),
    "negative token id": (lambda s, ids, r: s.score(ids - 100, None, r), "input_ids"),
    "longer than max_position_embeddings": (lambda s, ids, r: s.score(ids.repeat(1, 4), None,
                                                                      torch.arange(40).expand(2, 40) >= 30),
                                            "max_position_embeddings"),
    "position_ids [B, 3, T]": (lambda s, ids, r: s.score(ids, None, r, position_ids=torch.arange(10).expand(2, 3, 10)),
                               "position_ids"),
    "response not a suffix": (lambda s, ids, r: s.score(ids, None, r.flip(1)), "response_mask"),
    "attention_mask list": (lambda s, ids, r: s.score(ids, [[1] * 10] * 2, r), "attention_mask"),
    "response_mask missing": (lambda s, ids, r: s.score(ids, None, None), "response_mask"),
    "unknown config key": (lambda s, ids, r: RhythmScorer(s.model, windw=3), "windw"),
    "layers out of range": (lambda s, ids, r: RhythmScorer(s.model, layers=[7]), "layers"),
    "module without config": (lambda s, ids, r: RhythmScorer(torch.nn.Linear(2, 2)), "config"),
    "not a module": (lambda s, ids, r: RhythmScorer("gpt2"), "model"),
    # issue 19 item 10: a typo or a foreign knob in RhythmScores.selection overrides is refused, not ignored
    "selection qq": (lambda s, ids, r: s.score(ids, None, r).selection(qq=0.3), "qq"),
    "selection alpha": (lambda s, ids, r: s.score(ids, None, r).selection(alpha=0.3), "alpha"),
}


@pytest.mark.parametrize("name", list(SCORER_BAD))
def test_scorer_bad_input_is_refused_clearly(tiny_model, name):
    scorer = RhythmScorer(tiny_model, horizon=(1, None), window=2)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    response = torch.zeros(2, 10, dtype=torch.bool)
    response[:, 6:] = True
    call, words = SCORER_BAD[name]
    with pytest.raises(Exception) as info:
        call(scorer, ids, response)
    _assert_clear(info.value, words)


# ---- unusual but valid input: the same result as the ordinary spelling -----------------------------------------

def test_numpy_scalars_give_the_same_gamma():
    for strategy in ("coupled", "local", "global", "random"):
        ref = credit_multipliers(W, F, M, strategy=strategy, fai_valid=V, q=0.5, gamma_amp=2.0, alpha=0.25, k=2,
                                 seed=5)
        got = credit_multipliers(W, F, M, strategy=strategy, fai_valid=V, q=np.float64(0.5),
                                 gamma_amp=np.float32(2.0), alpha=np.float64(0.25), k=np.int64(2), seed=np.uint8(5))
        assert torch.equal(ref, got), strategy


def test_nan_fai_where_invalid_is_never_read():
    for strategy in ("coupled", "global"):
        ref = credit_multipliers(W, F, M, strategy=strategy, fai_valid=V)
        got = credit_multipliers(W, torch.where(V, F, math.nan), M, strategy=strategy, fai_valid=V)
        assert torch.equal(ref, got), strategy
    ref = rhythm_selection(W, F, M, V)
    got = rhythm_selection(W, torch.where(V, F, math.nan), M, V)
    assert all(torch.equal(getattr(ref, f), getattr(got, f)) for f in ("preplan", "anchor", "dominated", "intro"))


@pytest.mark.parametrize("strategy", ["coupled", "local", "global", "random", "entropy"])
def test_empty_time_axis(strategy):
    empty = torch.zeros(3, 0)
    gamma = credit_multipliers(empty, empty, empty.bool(), strategy=strategy, entropy=empty)
    assert gamma.shape == (3, 0) and gamma.dtype == torch.float32


def test_empty_time_axis_selections():
    empty = torch.zeros(3, 0)
    sel = rhythm_selection(empty, empty, empty.bool())
    assert sel.anchor.shape == (3, 0) and sel.preplan_count.tolist() == [0, 0, 0]
    assert sel.tau_delta.tolist() == [math.inf] * 3                  # as on an empty response
    assert random_selection(empty.bool()).shape == entropy_selection(empty, empty.bool()).shape == (3, 0)


def test_empty_responses_give_gamma_one():
    mask = torch.zeros(2, 12, dtype=torch.bool)
    for strategy in ("coupled", "local", "global", "random"):
        assert torch.equal(credit_multipliers(W, F, mask, strategy=strategy), torch.ones(2, 12))


def test_narrow_integer_input_ids(tiny_model):
    scorer = RhythmScorer(tiny_model, horizon=(1, None), window=2)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    response = torch.zeros(2, 10, dtype=torch.bool)
    response[:, 5:] = True
    ref = scorer.score(ids, None, response)
    for dtype in (torch.uint8, torch.int32, torch.int16):
        got = scorer.score(ids.to(dtype), None, response.int())
        assert torch.equal(ref.waad, got.waad) and torch.equal(ref.fai, got.fai), dtype
        assert torch.equal(ref.gamma(), got.gamma()), dtype


def test_config_spellings_agree():
    ref = RhythmCreditConfig(window=5, horizon=(2, None), layers=(1, 2), k=2, q=0.5)
    for spelling in (dict(window=np.int64(5), horizon=[2, None], layers=[2, 1, 1], k=np.int32(2), q=np.float64(0.5)),
                     dict(window=5, horizon=(np.int8(2), None), layers=np.array([1, 2]), k=2, q=0.5)):
        assert RhythmCreditConfig(**spelling) == ref
    assert RhythmCreditConfig.from_mapping(ref.to_dict()) == ref
    assert ScorerConfig(**ref.scorer_kwargs()).horizon == (2, None)


def test_shape_advantages_accepts_zero_and_large_gamma():
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    gamma = torch.tensor([[0.0, 1.0, 1e6]])
    assert torch.equal(shape_advantages(adv, gamma), torch.tensor([[0.0, -2.0, 3e6]]))
    # masked positions of apply-style callers may hold NaN only if they are replaced before shaping
    masked = torch.where(torch.tensor([[True, True, False]]), torch.tensor([[1.5, 1.0, math.nan]]), 1.0)
    assert torch.equal(shape_advantages(adv, masked), torch.tensor([[1.5, -2.0, 3.0]]))


# ---- trainer adapters: their settings are checked on construction too ---------------------------------------

TRAINER_BAD = [("rhythm_q", 0, "(0, 1]"), ("rhythm_window", True, "an int >= 1"),
               ("rhythm_horizon", [100, 10], "a pair"), ("rhythm_backend", "tpu", "one of"),
               ("rhythm_seed", 2 ** 70, "[0, 2**64)"), ("rhythm_gamma_amp", 1e300, "finite float32")]


@pytest.mark.parametrize("field, value, words", TRAINER_BAD)
def test_trl_config_refuses_bad_rhythm_fields(tmp_path, field, value, words):
    pytest.importorskip("trl")
    from rhythm.integrations.trl import RhythmGRPOConfig

    with pytest.raises(Exception) as info:
        RhythmGRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **{field: value})
    _assert_clear(info.value, f"RhythmGRPOConfig.{field} must be")
    assert words in str(info.value)


@pytest.mark.parametrize("text, words", [('{"windwo": 3}', "did you mean 'window'"), ('{"q": 0}', "q must be"),
                                         ("[1, 2]", "mapping"), ("{q: 1}", "JSON object")])
def test_verl_env_config_refused_clearly(monkeypatch, text, words):
    from rhythm.integrations.verl import hooks as verl_hooks

    monkeypatch.setenv(verl_hooks.CONFIG_ENV, text)
    with pytest.raises(Exception) as info:
        verl_hooks.config_from_env()
    _assert_clear(info.value, words)


# ---- issue 19 item 8: only documented values switch the verl credit --------------------------------------------

@pytest.mark.parametrize("value, enabled", [("", True), ("1", True), ("On", True), ("yes", True), ("0", False),
                                            ("off", False), (" FALSE ", False), ("no", False)])
def test_verl_credit_switch_documented_values(monkeypatch, value, enabled):
    from rhythm.integrations.verl import hooks as verl_hooks

    monkeypatch.setenv(verl_hooks.ENABLE_ENV, value)
    monkeypatch.delenv(verl_hooks.CONFIG_ENV, raising=False)
    assert (verl_hooks.auto_config() is not None) == enabled
    assert (verl_hooks.resolve_config({"rhythm": {"strategy": "local"}}) is not None) == enabled


@pytest.mark.parametrize("value", ["maybe", "2", "enable", "o n"])
def test_verl_credit_switch_refuses_other_values(monkeypatch, value):
    from rhythm.integrations.verl import hooks as verl_hooks

    monkeypatch.setenv(verl_hooks.ENABLE_ENV, value)
    for call in (verl_hooks.auto_config, lambda: verl_hooks.resolve_config({"rhythm": {}})):
        with pytest.raises(Exception) as info:
            call()
        _assert_clear(info.value, "$RHYTHM_CREDIT must be")
        assert repr(value) in str(info.value)


def test_shape_advantages_fp16_in_range_stays_fp16():
    adv = torch.full((1, 3), 3e4, dtype=torch.float16)
    out = shape_advantages(adv, torch.tensor([[1.0, 2.0, 1.0]]), sign="positive")
    assert out.dtype == torch.float16 and out.tolist() == [[3e4, 6e4, 3e4]]


# ---- the command line under faults: one line naming the file or row, exit 2, nothing written lost -----------------
# (issues 19 item 4 and 26 items 3, 4). Each case once failed with a traceback, late, or blocked forever.

CLI_CASES = {   # name -> (input rows as text lines, extra flags, what to plant beside the output, words of the error)
    "row nested 5000 deep": (['{"prompt_ids": [1], "response_ids": [2], "x": ' + "[" * 5000 + "]" * 5000 + "}"],
                             [], None, "in.jsonl:1: nested too deeply"),
    "id of 5000 digits": (['{"id": ' + "7" * 5000 + ', "prompt_ids": [1], "response_ids": [2]}'], [], None,
                          "in.jsonl:1: a number with more than"),
    "NaN in a row": (['{"prompt_ids": [1], "response_ids": [2], "reward": NaN}'], [], None,
                     "in.jsonl:1: not valid JSON (NaN is not JSON)"),
    "settings file: a list": (None, [], ("settings", "[1, 2]"), "is not a settings file written by rhythm score"),
    "settings file: a number": (None, [], ("settings", "5"), "is not a settings file written by rhythm score"),
    "settings file: a string": (None, [], ("settings", '"x"'), "is not a settings file written by rhythm score"),
    "settings file: settings a list": (None, [], ("settings", '{"format": 1, "settings": [1]}'),
                                       "is not a settings file written by rhythm score"),
    "settings file: a folder": (None, [], ("settings", None), "is a folder, not a regular file"),
    "temperature 1e-300": (None, ["--temperature", "1e-300"], None, "--temperature: must be a finite number > 0, "
                                                                     "at least 1e-06"),
    "empty model folder": (None, ["--model", "{tmp}/empty"], ("mkdir", "empty"), "has no config.json"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_faults_are_one_line_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from rhythm import models
    from rhythm.app import cli

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    lines, flags, plant, words = CLI_CASES[case]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 3}')
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines or ['{"prompt_ids": [1], "response_ids": [2]}']) + "\n")
    if plant and plant[0] == "settings":
        target = tmp_path / "out.jsonl.settings.json"
        target.mkdir() if plant[1] is None else target.write_text(plant[1])
        dst.write_text("")
    elif plant and plant[0] == "mkdir":
        (tmp_path / plant[1]).mkdir()
    argv = ["score", "--model", str(model), "--input", str(src), "--output", str(dst), "--quiet"]
    argv += [f.format(tmp=tmp_path) for f in flags]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and words in err[0] and err[0].startswith("rhythm"), err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The saved tiny Llama of tests/test_cli.py."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tests.test_cli import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def test_corrupted_parquet_on_resume(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    from rhythm.app import cli

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    src.write_text('{"prompt_ids": [1], "response_ids": [2]}\n')
    dst.write_bytes(b"PAR1" + b"\x00garbage" * 50)
    assert cli.main(["score", "--model", str(model), "--input", str(src), "--output", str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{dst} is not a readable Parquet file" in err[0], err


def _run_cli(argv, *, timeout=120, **kwargs):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *sys.path]), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "rhythm.app.cli", *argv], env=env, timeout=timeout,
                          capture_output=True, **kwargs)


@pytest.mark.parametrize("fifo", ["out.jsonl", "out.jsonl.settings.json"])
def test_a_fifo_as_output_or_settings_file_is_refused(tmp_path, fifo):
    """Before: opening the FIFO blocked forever (the timeout turns that into a failure here)."""
    import os

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt_ids": [1], "response_ids": [2]}\n')
    os.mkfifo(tmp_path / fifo)
    proc = _run_cli(["score", "--model", str(tmp_path / "model"), "--input", str(src), "--output",
                     str(tmp_path / "out.jsonl")], timeout=60)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, err
    assert "is a FIFO (named pipe), not a regular file" in err[0] and fifo in err[0]


def _tiny_rows(model_dir, n):
    import transformers

    from tests.test_cli import CORPUS

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return "".join(json.dumps({"id": f"r{i}", "prompt_ids": tok(CORPUS[i % 3]).input_ids[:6],
                               "response_ids": tok(CORPUS[2]).input_ids[:20]}) + "\n" for i in range(n))


def test_stdout_closed_early_exits_quietly(tiny_model_dir, tmp_path):  # noqa: F811
    """`rhythm score --output - | head -c 200`: no BrokenPipeError traceback, the closed pipe's exit status."""
    import os
    import subprocess
    import sys

    src = tmp_path / "in.jsonl"
    src.write_text(_tiny_rows(tiny_model_dir, 12))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *sys.path]), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "rhythm.app.cli", "score", "--model", str(tiny_model_dir),
                             "--input", str(src), "--output", "-", "--micro-batch-size", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = proc.stdout.read(200)
    proc.stdout.close()                       # what `head -c 200` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and len(head) == 200
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_a_full_disk_keeps_the_rows_written_and_resumes(tiny_model_dir, tmp_path):  # noqa: F811
    """A file size limit (`ulimit -f`) hit mid-run: one line naming the output, exit 2, the file cut back to
    whole micro-batches; the same command then finishes with every id once and the same values."""
    import resource

    src, dst, ref = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    src.write_text(_tiny_rows(tiny_model_dir, 8))
    argv = ["score", "--model", str(tiny_model_dir), "--input", str(src), "--quiet", "--micro-batch-size", "2"]
    assert _run_cli(argv + ["--output", str(ref)]).returncode == 0
    limit = len(ref.read_bytes()) // 2                # room for about half of the rows

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _run_cli(argv + ["--output", str(dst)], preexec_fn=small_files)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, err
    assert f"cannot write to {dst} (File too large)" in err[0] and "rows written before are kept" in err[0]
    kept = dst.read_text()
    assert kept.endswith("\n") and 0 < kept.count("\n") < 8 and kept.count("\n") % 2 == 0
    assert _run_cli(argv + ["--output", str(dst)]).returncode == 0
    assert sorted(dst.read_text().splitlines()) == sorted(ref.read_text().splitlines())


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root writes read-only files anyway")
def test_a_read_only_output_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from rhythm.app import cli

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    argv = ["score", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(dst), "--quiet"]
    src.write_text(_tiny_rows(tiny_model_dir, 1))
    assert cli.main(argv) == 0
    src.write_text(_tiny_rows(tiny_model_dir, 2))
    dst.chmod(0o444)
    assert cli.main(argv) == 2
    assert "is not writable (read-only)" in capsys.readouterr().err
