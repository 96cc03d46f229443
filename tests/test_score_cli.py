"""``rhythm score`` rows and CLI conventions: no row lost or doubled (kill + resume), ids unambiguous,
settings stored and checked on resume, bad input refused in one line with exit code 2 before the model loads,
and the output columns equal to ``RhythmScorer.score`` on the same rows."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from rhythm import models  # noqa: E402
from rhythm.app import cli
from rhythm.app.common import chat_ids
from tests.test_cli import CORPUS, tiny_model_dir  # noqa: E402,F401  (the saved tiny Llama + tokenizer)

REPO = Path(__file__).resolve().parents[1]


def _token_rows(tok, n, *, ids=True):
    rows = []
    for i in range(n):
        row = {"prompt_ids": tok(CORPUS[i % 3]).input_ids[: 5 + i % 4],
               "response_ids": tok(CORPUS[(i + 1) % 3]).input_ids[: 12 + 2 * (i % 5)]}
        if ids:
            row = {"id": f"r{i}", **row}
        rows.append(row)
    return rows


def _write(path, rows, *, last_newline=True):
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows)
    path.write_text(text + ("\n" if last_newline else ""), encoding="utf-8")


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _args(model, src, dst, *extra):
    return ["score", "--model", str(model), "--input", str(src), "--output", str(dst), "--quiet", *extra]


@pytest.fixture
def tok(tiny_model_dir):  # noqa: F811
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the weights are loaded (errors must come before)."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(models, "load_model", refuse)


def _error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ---- resume: rows never lost or doubled ----------------------------------------------------------------------

def test_complete_last_row_without_newline_is_kept(tiny_model_dir, tok, tmp_path):  # noqa: F811
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, _token_rows(tok, 3))
    assert cli.main(_args(tiny_model_dir, src, dst)) == 0
    full = dst.read_text()
    dst.write_text(full.rstrip("\n"))                       # a complete last row, its newline missing
    assert cli.main(_args(tiny_model_dir, src, dst)) == 0
    assert dst.read_text() == full                          # kept (newline restored), nothing redone or doubled
    lines = full.splitlines(keepends=True)
    dst.write_text("".join(lines[:2]) + lines[2][:40])      # a torn last row: cut and scored again
    assert cli.main(_args(tiny_model_dir, src, dst)) == 0
    assert _read(dst) == [json.loads(line) for line in lines]


def test_kill_mid_run_then_resume(tiny_model_dir, tok, tmp_path):  # noqa: F811
    """A real interruption: SIGKILL the CLI process once it has written some rows, resume, compare with an
    uninterrupted run: every id once, same values."""
    src, dst, ref = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    _write(src, _token_rows(tok, 12))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "rhythm.app.cli", *_args(tiny_model_dir, src, dst),
                             "--micro-batch-size", "1"], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if dst.exists() and dst.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    written = _read(dst) if dst.read_text().endswith("\n") else _read(dst)[:-1]
    assert 2 <= len(written) < 12
    assert cli.main(_args(tiny_model_dir, src, dst)) == 0
    assert cli.main(_args(tiny_model_dir, src, ref)) == 0
    got, want = _read(dst), _read(ref)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in want) == sorted(f"r{i}" for i in range(12))
    want = {r["id"]: r for r in want}
    for r in got:
        assert r["gamma_coupled"] == want[r["id"]]["gamma_coupled"]
        assert r["response_ids"] == want[r["id"]]["response_ids"]
        torch.testing.assert_close(torch.tensor(r["fai"]), torch.tensor(want[r["id"]]["fai"]), atol=1e-6, rtol=0)


def test_settings_stored_and_resume_with_other_settings_refused(tiny_model_dir, tok, tmp_path, capsys):  # noqa: F811
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, _token_rows(tok, 2))
    assert cli.main(_args(tiny_model_dir, src, dst)) == 0
    stored = json.loads((tmp_path / "out.jsonl.settings.json").read_text())["settings"]
    assert stored["window"] == 10 and stored["horizon"] == [10, 100] and stored["q"] == 0.4
    assert stored["strategies"] == ["coupled", "local", "global"] and stored["ids"] == "str"
    _write(src, _token_rows(tok, 3))                        # one more row, but other settings
    for extra, words in ((["--window", "4"], "window: 10 there, 4 now"),
                         (["--strategies", "coupled"], 'strategies: ["coupled", "local", "global"] there, '
                                                       '["coupled"] now'),
                         (["--q", "0.3"], "q: 0.4 there, 0.3 now"),
                         (["--horizon", "2", "end"], "horizon: [10, 100] there, [2, null] now"),
                         (["--no-chat-template"], "chat_template: true there, false now")):
        capsys.readouterr()
        assert cli.main(_args(tiny_model_dir, src, dst, *extra)) == 2
        assert words in _error(capsys)
    assert len(_read(dst)) == 2                              # nothing appended
    dst.unlink()                                             # settings without rows: a new run may change them
    assert cli.main(_args(tiny_model_dir, src, dst, "--window", "4")) == 0
    (tmp_path / "out.jsonl.settings.json").unlink()          # rows without settings: refused
    capsys.readouterr()
    assert cli.main(_args(tiny_model_dir, src, dst, "--window", "4")) == 2
    assert "no record of the settings" in _error(capsys)


def test_parquet_schema_from_settings_and_int_ids(tiny_model_dir, tok, tmp_path):  # noqa: F811
    pq = pytest.importorskip("pyarrow.parquet")
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    rows = _token_rows(tok, 3, ids=False)
    rows = [{"id": 10 + i, **r} for i, r in enumerate(rows)]
    _write(src, rows[:2])
    strategies = ["--strategies", "coupled,random"]
    assert cli.main(_args(tiny_model_dir, src, dst, *strategies)) == 0
    _write(src, rows)                                        # resume after completion: one more row
    assert cli.main(_args(tiny_model_dir, src, dst, *strategies)) == 0
    table = pq.read_table(dst)
    assert table.column("id").to_pylist() == [10, 11, 12] and str(table.schema.field("id").type) == "int64"
    assert table.column_names == ["id", "prompt_length", "response_ids", "waad", "fai", "fai_valid",
                                  "gamma_coupled", "gamma_random"]
    assert json.loads(table.schema.metadata[b"rhythm_score_settings"])["strategies"] == ["coupled", "random"]
    # killed after the merged file replaced the output but before the journal was deleted: merged once
    journal = tmp_path / "out.parquet.partial.jsonl"
    journal.write_text("".join(json.dumps(r) + "\n" for r in table.slice(1).to_pylist()))
    assert cli.main(_args(tiny_model_dir, src, dst, *strategies)) == 0
    assert pq.read_table(dst).column("id").to_pylist() == [10, 11, 12] and not journal.exists()


# ---- bad input: one line, exit code 2, before the model loads ----------------------------------------------

BAD_INPUTS = [  # (lines of the input file, words of the error)
    (['{"id": "a", "prompt_ids": [1], "response_ids": [2]}', '[1, 2]'], "in.jsonl:2: expected a JSON object"),
    (['{"id": "a", "prompt_ids": [1], "response_ids": [2]}', '{"id": "b", "prompt_ids": [1.0], "response_ids": [2]}'],
     "in.jsonl:2: prompt_ids[0] must be a token id (an int >= 0), got a float 1.0"),
    (['{"prompt_ids": [1], "response_ids": [true]}'], "in.jsonl:1: response_ids[0] must be a token id"),
    (['{"prompt_ids": [1], "response_ids": [-4]}'], "response_ids[0] must be a token id (an int >= 0), got an int -4"),
    (['{"prompt_ids": [1], "response_ids": [99999]}'], "in.jsonl:1: response_ids[0] = 99999 is outside the model's "
                                                       "vocabulary"),
    (['{"prompt": "", "response": ""}'], "in.jsonl:1: empty prompt and response"),
    (['{"prompt_ids": [], "response_ids": []}'], "in.jsonl:1: empty prompt_ids and response_ids"),
    (['{"prompt": "a", "response": 3}'], "in.jsonl:1: 'response' must be a string, got an int"),
    (['{"prompt": "a"}'], "in.jsonl:1: has prompt but no 'response'"),
    (['{"prompt": "a", "response": "b", "prompt_ids": [1], "response_ids": [2]}'], "not both"),
    (['{"id": 1, "prompt": "a", "response": "b"}', '{"id": 1, "prompt": "c", "response": "d"}'],
     "in.jsonl:2: duplicate id 1 (also on line 1)"),
    (['{"id": 1, "prompt": "a", "response": "b"}', '{"id": "1", "prompt": "c", "response": "d"}'],
     "in.jsonl:2: id '1' is a string but the id on line 1 is an int"),
    (['{"id": 2, "prompt": "a", "response": "b"}', '{"prompt": "c", "response": "d"}'],
     "some rows have an 'id' (line 1) and some do not (line 2)"),
    (['{"id": null, "prompt": "a", "response": "b"}'], "'id' must be an int or a string, got null"),
    (['{"id": 1.5, "prompt": "a", "response": "b"}'], "'id' must be an int or a string, got a float"),
    (['{"prompt": "a", "response": "\\ud800"}'], "lone surrogate"),
    (['{"prompt": "a", "response": "b"', ], "in.jsonl:1: not valid JSON"),
    ([], "in.jsonl: no rows"),
]


@pytest.mark.parametrize("lines, words", BAD_INPUTS, ids=[w[:30] for _, w in BAD_INPUTS])
def test_bad_rows_one_line_before_the_model_loads(tiny_model_dir, tmp_path, capsys, no_model_load,  # noqa: F811
                                                  lines, words):
    src = tmp_path / "in.jsonl"
    _write(src, lines)
    assert cli.main(_args(tiny_model_dir, src, tmp_path / "out.jsonl")) == 2
    line = _error(capsys)
    assert words in line and line.startswith("rhythm: error: ")


def test_undecodable_bytes(tiny_model_dir, tmp_path, capsys, no_model_load):  # noqa: F811
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n')
    assert cli.main(_args(tiny_model_dir, src, tmp_path / "out.jsonl")) == 2
    assert "in.jsonl:2: not valid UTF-8" in _error(capsys)


def test_too_long_for_the_model(tiny_model_dir, tmp_path, capsys, no_model_load):  # noqa: F811
    src = tmp_path / "in.jsonl"
    _write(src, [{"prompt_ids": [5] * 300, "response_ids": [6] * 300}])
    assert cli.main(_args(tiny_model_dir, src, tmp_path / "out.jsonl")) == 2
    assert "300 prompt + 300 response tokens exceed the model's max_position_embeddings = 512" in _error(capsys)


def test_rows_already_written_survive_a_later_bad_input(tiny_model_dir, tok, tmp_path, capsys):  # noqa: F811
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, _token_rows(tok, 2))
    assert cli.main(_args(tiny_model_dir, src, dst)) == 0
    before = dst.read_bytes()
    _write(src, _token_rows(tok, 2) + ['{"id": "r9", "prompt_ids": [1], "response_ids": [-1]}'])
    assert cli.main(_args(tiny_model_dir, src, dst)) == 2
    assert dst.read_bytes() == before


# ---- CLI conventions --------------------------------------------------------------------------------------------

def _usage_cases(tmp_path, src):
    (tmp_path / "afile").write_text("x")
    return [
        (["score", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl")],
         "--input", "does not exist"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--strategies", "coupled,rhythm"],
         "--strategies", "comma-separated list of local, global, coupled, random, entropy"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--q", "0"], "--q", "(0, 1]"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--q", "1.5"], "--q", "(0, 1]"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--window", "-3"], "--window",
         "an int >= 1"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--horizon", "100", "10"],
         "--horizon", "H_hi None"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--backend", "tpu"], "--backend",
         "must be one of ('auto', 'triton', 'torch', 'reference'), got 'tpu'"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--gamma-amp", "1e300"],
         "--gamma-amp", "finite float32"),
        (["score", "--input", str(src), "--output", str(tmp_path / "afile" / "o.jsonl")], "--output",
         "not a directory"),
        (["score", "--input", str(src), "--output", str(tmp_path / "nodir" / "o.jsonl")], "--output",
         "not a directory"),
        (["score", "--input", str(src), "--output", str(src)], "--output", "is the input file"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.csv")], "--output", ".jsonl or .parquet"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--model", str(tmp_path / "nomodel")],
         "--model", "does not exist"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--dtype", "float8"], "--dtype",
         "invalid choice"),
        (["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--device", "banana"], "--device",
         "not a torch device"),
        (["analyze", "--max-new-tokens", "0"], "--max-new-tokens", "an int >= 1"),
        (["analyze", "--out", str(tmp_path / "afile")], "--out", "not a directory"),
        (["frobnicate"], "invalid choice", "frobnicate"),
    ]


def test_user_errors_one_line_exit_2(tmp_path, capsys, no_model_load):
    src = tmp_path / "in.jsonl"
    _write(src, ['{"prompt": "a", "response": "b"}'])
    for argv, flag, words in _usage_cases(tmp_path, src):
        assert cli.main(argv) == 2, argv
        line = _error(capsys)
        assert flag in line and words in line and line.startswith("rhythm"), (argv, line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys, no_model_load):
    src = tmp_path / "in.jsonl"
    _write(src, ['{"prompt": "a", "response": "b"}'])
    assert cli.main(["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in _error(capsys)


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("rhythm 0.")
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    text = capsys.readouterr().out
    for words in ("{auto,float32,bfloat16,float16}", "{auto,triton,torch,reference}", "(default: 0.4)",
                  "--gamma-amp", "--alpha", "--k K", "--seed", "--layers", "--head-fraction", "--horizon H_LO H_HI",
                  "--quiet", "--chat-template"):
        assert words in text, words


def test_stdin_to_stdout_without_progress_frames(tiny_model_dir, tok, monkeypatch, capsys):  # noqa: F811
    """JSONL flows through `--input - --output -`; a redirected stderr gets no progress bars (no \\r frames)."""
    import io

    rows = _token_rows(tok, 3)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert cli.main(["score", "--model", str(tiny_model_dir), "--input", "-", "--output", "-"]) == 0
    captured = capsys.readouterr()
    out = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["id"] for r in out] == ["r0", "r1", "r2"] and "\r" not in captured.err
    assert "wrote 3 rows to -" in captured.err


# ---- the output columns equal RhythmScorer.score ------------------------------------------------------------

def _expected_columns(model, rows, strategies):
    """Each row scored alone with RhythmScorer (no padding, no batching, the response as a suffix)."""
    from rhythm import RhythmScorer

    scorer = RhythmScorer(model)
    expected = {}
    for row in rows:
        p, r = row["prompt_ids"], row["response_ids"]
        ids = torch.tensor([p + r])
        response = torch.zeros_like(ids, dtype=torch.bool)
        response[0, len(p):] = True
        scores = scorer.score(ids, None, response)
        cut = slice(len(p), len(p) + len(r))
        cols = {"waad": scores.waad[0, cut].tolist(), "fai": scores.fai[0, cut].tolist(),
                "fai_valid": scores.fai_valid[0, cut].tolist()}
        # random: each row drawn from sha256(seed, id), so batching and resumes cannot change it
        cols.update({f"gamma_{s}": scores.gamma(s, row_ids=[row["id"]])[0, cut].tolist() for s in strategies})
        expected[row["id"]] = cols
    return expected


def _columns_match(output_rows, expected, atol):
    for row in output_rows:
        want = expected[row["id"]]
        for key, values in want.items():
            got = torch.tensor(row[key], dtype=torch.float64)
            ref = torch.tensor(values, dtype=torch.float64)
            if got.shape != ref.shape or not torch.allclose(got, ref, atol=atol, rtol=0):
                return False
    return True


def test_output_columns_equal_the_scorer(tiny_model_dir, tok, tmp_path):  # noqa: F811
    strategies = ["coupled", "local", "global", "random"]
    rows = _token_rows(tok, 4)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, rows)
    assert cli.main(_args(tiny_model_dir, src, dst, "--micro-batch-size", "1", "--strategies",
                          ",".join(strategies))) == 0
    out = _read(dst)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    expected = _expected_columns(model, rows, strategies)
    assert _columns_match(out, expected, atol=0.0)           # one row per batch: the same computation, bitwise
    # micro-batches of 4 (batch_invariant, the default): each row still its own forward, the same bits
    dst2 = tmp_path / "out2.jsonl"
    assert cli.main(_args(tiny_model_dir, src, dst2, "--micro-batch-size", "4", "--strategies",
                          ",".join(strategies))) == 0
    assert _read(dst2) == out
    # one padded forward per micro-batch: the signals agree at the numerical contract's tolerance
    dst3 = tmp_path / "out3.jsonl"
    assert cli.main(_args(tiny_model_dir, src, dst3, "--micro-batch-size", "4", "--no-batch-invariant",
                          "--strategies", ",".join(strategies))) == 0
    padded = [{k: v for k, v in r.items() if not k.startswith("gamma")} for r in _read(dst3)]
    assert _columns_match(padded, {i: {k: v for k, v in e.items() if not k.startswith("gamma")}
                                   for i, e in expected.items()}, atol=1e-4)
    settings = {name: json.loads(path.with_name(path.name + ".settings.json").read_text())["settings"]
                for name, path in (("invariant", dst2), ("batched", dst3))}
    assert settings["invariant"]["batch_invariant"] is True and "micro_batch_size" not in settings["invariant"]
    assert settings["batched"]["batch_invariant"] is False and settings["batched"]["micro_batch_size"] == 4
    # planted bugs the comparison must catch: a gamma column shifted by one token, waad written from fai
    shifted = [dict(r, gamma_coupled=[1.0] + r["gamma_coupled"][:-1]) for r in out]
    assert any(r["gamma_coupled"] != s["gamma_coupled"] for r, s in zip(out, shifted))
    assert not _columns_match(shifted, expected, atol=0.0)
    swapped = [dict(r, waad=r["fai"]) for r in out]
    assert not _columns_match(swapped, expected, atol=1e-4)


def test_text_prompts_use_the_chat_template_like_analyze(tiny_model_dir, tok, tmp_path):  # noqa: F811
    src = tmp_path / "in.jsonl"
    _write(src, [{"prompt": CORPUS[0], "response": CORPUS[2]}])
    templated = chat_ids(tok, CORPUS[0])[0].tolist()          # what `rhythm analyze` feeds the model
    plain = tok(CORPUS[0]).input_ids
    assert len(templated) > len(plain)
    for extra, want in (([], templated), (["--no-chat-template"], plain)):
        dst = tmp_path / f"out{len(extra)}.jsonl"
        assert cli.main(_args(tiny_model_dir, src, dst, *extra)) == 0
        (row,) = _read(dst)
        assert row["id"] == 1 and row["prompt_length"] == len(want)
        assert row["response_ids"] == tok(CORPUS[2], add_special_tokens=False).input_ids


# ---- findings of the review pass: random baseline per row, untaught models, Parquet ids ------------------------

def test_random_gamma_depends_only_on_seed_and_row_id(tiny_model_dir, tok, tmp_path):  # noqa: F811
    """gamma_random of a row is the same whatever the micro-batch size or resume point: each row is drawn as if
    scored alone, from a generator seeded with sha256(seed, id): ceil(q n) of its n response tokens."""
    import math

    from rhythm.credit.shaping import credit_multipliers

    src = tmp_path / "in.jsonl"
    rows = _token_rows(tok, 7)
    _write(src, rows)
    out = {}
    for size in (2, 3):
        dst = tmp_path / f"mb{size}.jsonl"
        assert cli.main(_args(tiny_model_dir, src, dst, "--strategies", "random", "--micro-batch-size",
                              str(size), "--seed", "5")) == 0
        out[size] = {r["id"]: r["gamma_random"] for r in _read(dst)}
    assert out[2] == out[3]
    resumed = tmp_path / "resumed.jsonl"
    first = (tmp_path / "mb2.jsonl").read_text().splitlines(keepends=True)[:3]
    resumed.write_text("".join(first))
    (tmp_path / "resumed.jsonl.settings.json").write_text((tmp_path / "mb2.jsonl.settings.json").read_text())
    assert cli.main(_args(tiny_model_dir, src, resumed, "--strategies", "random", "--micro-batch-size", "2",
                          "--seed", "5")) == 0
    assert {r["id"]: r["gamma_random"] for r in _read(resumed)} == out[2]
    for row in rows:
        p, n = len(row["prompt_ids"]), len(row["response_ids"])
        response = torch.zeros(1, p + n, dtype=torch.bool)
        response[0, p:] = True
        zeros = torch.zeros(1, p + n)
        want = credit_multipliers(zeros, zeros, response, strategy="random", seed=5, row_ids=[row["id"]])[0, p:]
        got = torch.tensor(out[2][row["id"]])
        assert torch.equal(got, want) and int((got > 1).sum()) == math.ceil(0.4 * n)


def test_untaught_architecture_refused_before_the_model_loads(tiny_model_dir, tmp_path, no_model_load,  # noqa: F811
                                                              capsys):
    """A checkpoint whose model type the capture was not taught about: one line, exit 2, before the weights
    load (score) or a token is generated (analyze)."""
    import shutil

    model = tmp_path / "bloom"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="bloom", architectures=["BloomForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    src = tmp_path / "in.jsonl"
    _write(src, [{"id": 1, "prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10]}])
    assert cli.main(_args(model, src, tmp_path / "o.jsonl")) == 2
    assert "model type 'bloom'" in _error(capsys)
    assert cli.main(["analyze", "--model", str(model), "--out", str(tmp_path / "rep"), "--quiet"]) == 2
    assert "model type 'bloom'" in _error(capsys)


def test_parquet_int_ids_beyond_int64_refused_before_scoring(tiny_model_dir, tmp_path, no_model_load, capsys):  # noqa: F811
    pytest.importorskip("pyarrow")
    src = tmp_path / "in.jsonl"
    _write(src, [{"id": 2 ** 70, "prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10]}])
    assert cli.main(_args(tiny_model_dir, src, tmp_path / "o.parquet")) == 2
    assert "int64" in _error(capsys) and not (tmp_path / "o.parquet").exists()


# ---- the score job's Python API (what `rhythm score` runs; a worker process calls it per micro-batch) ---------

def test_score_job_per_micro_batch_equals_the_command(tiny_model_dir, tok, tmp_path):  # noqa: F811
    """ScoreJob(settings).score_rows called once per micro-batch (a fresh job from an unpickled settings object,
    as a worker would) gives the rows `rhythm score` writes, bitwise, including the per-row random baseline."""
    import pickle

    from rhythm import ScorerConfig
    from rhythm.app.rows import parse_row
    from rhythm.app.score import ScoreJob, ScoreSettings

    rows = _token_rows(tok, 5)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, rows)
    flags = ["--micro-batch-size", "2", "--strategies", "coupled,random,entropy", "--seed", "3"]
    assert cli.main(_args(tiny_model_dir, src, dst, *flags)) == 0
    settings = ScoreSettings(model=str(tiny_model_dir), strategies=("coupled", "random", "entropy"),
                             scorer=ScorerConfig(micro_batch_size=2, seed=3))
    assert settings.record("str") == json.loads((tmp_path / "out.jsonl.settings.json").read_text())["settings"]
    job = ScoreJob(pickle.loads(pickle.dumps(settings)))
    parsed = [parse_row(r, f"row {i}", i + 1) for i, r in enumerate(rows)]
    job.tokenize(parsed)
    assert job.model is None                                 # the checks do not load the weights
    got = job.score_rows(parsed[:2]) + job.score_rows(parsed[2:4]) + job.score_rows(parsed[4:])
    assert got == _read(dst)
    assert ScoreJob(settings).score_rows(parsed) == got      # one call: the same micro-batches


# ---- issue 20: `rhythm score` and `rhythm analyze` on architectures beyond Llama ---------------------------------

@pytest.mark.parametrize("kind", ["olmo3", "qwen3_moe", "qwen3_5", "deepseek_v3"])
def test_score_and_analyze_other_architectures(tiny_model_dir, tok, tmp_path, kind):  # noqa: F811
    """A saved tiny OLMo 3 / Qwen3-MoE / Qwen3.5 (hybrid) / DeepSeek-V3 (MLA) with the test tokenizer: `rhythm
    score` rows equal RhythmScorer on each row alone (bitwise, one row per micro-batch), and `rhythm analyze`
    writes its report naming the sampled layers (the hybrid's: its softmax-attention layer 3 only)."""
    import shutil

    from tests.tiny_architectures import tiny_architecture

    path = tmp_path / kind
    shutil.copytree(tiny_model_dir, path)
    (path / "model.safetensors").unlink()
    tiny_architecture(kind, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id).save_pretrained(path)
    rows = _token_rows(tok, 3)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, rows)
    strategies = ["coupled", "local", "global"]
    assert cli.main(_args(path, src, dst, "--micro-batch-size", "1", "--strategies", ",".join(strategies))) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert model.config.model_type == ("qwen3_5_text" if kind == "qwen3_5" else kind)
    assert _columns_match(_read(dst), _expected_columns(model, rows, strategies), atol=0.0)
    out = tmp_path / "report"
    assert cli.main(["analyze", "--model", str(path), "--max-new-tokens", "12", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "rhythm.json").read_text())
    want = [3] if kind == "qwen3_5" else [1, 2]     # 6 layers with attention on 1, 3, 5; else 4 layers -> [1, 2]
    assert data["layers"] == want and len(data["waad"]) == len(data["tokens"]) > 0
    assert (out / "rhythm.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_multimodal_checkpoint_loaded_text_only_is_scored(tiny_model_dir, tok, tmp_path, monkeypatch,  # noqa: F811
                                                          capsys):
    """A Qwen3.5 checkpoint as released (model type qwen3_5: text + vision configs): AutoModelForCausalLM loads
    its text-only causal LM (transformers' "VLM compatibility"), which the capture describes, so `rhythm score`
    accepts it; a Gemma 3 multimodal checkpoint loads with its vision tower and stays refused before the load."""
    import shutil

    path = tmp_path / "qwen3_5_vl"
    shutil.copytree(tiny_model_dir, path)
    (path / "model.safetensors").unlink()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=8, linear_value_head_dim=8, full_attention_interval=2)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
    torch.manual_seed(0)
    transformers.Qwen3_5ForConditionalGeneration(
        transformers.Qwen3_5Config(text_config=text, vision_config=vision)).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen3_5"
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, _token_rows(tok, 2))
    assert cli.main(_args(path, src, dst)) == 0 and len(_read(dst)) == 2
    gemma = tmp_path / "gemma3_vl"
    shutil.copytree(tiny_model_dir, gemma)
    (gemma / "model.safetensors").unlink()
    transformers.Gemma3Config(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8)).save_pretrained(gemma)
    loads = []
    capsys.readouterr()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(1))
    assert cli.main(_args(gemma, src, tmp_path / "g.jsonl")) == 2 and loads == []
    assert "model type 'gemma3'" in _error(capsys)


# ---- one run per output, streaming, kept fields (issues 19 and 22) --------------------------------------------

def _cli_process(argv, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "rhythm.app.cli", *argv], env=env, **kwargs)


def test_a_second_run_on_the_same_output_fails_at_once(tiny_model_dir, tok, tmp_path, capsys):  # noqa: F811
    """Two concurrent runs on one output: the second fails at once naming the output; the first finishes with
    every id once (before: both appended, every id twice)."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, _token_rows(tok, 24))
    proc = _cli_process(_args(tiny_model_dir, src, dst, "--micro-batch-size", "1"), stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (dst.exists() and dst.read_text().count("\n")):
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before the second run started: {proc.stderr.read().decode()}"
    started = time.time()
    assert cli.main(_args(tiny_model_dir, src, dst)) == 2
    line = _error(capsys)
    assert str(dst) in line and "another rhythm score run" in line and time.time() - started < 10
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    proc.stderr.close()
    assert sorted(r["id"] for r in _read(dst)) == sorted(f"r{i}" for i in range(24))
    assert cli.main(_args(tiny_model_dir, src, dst)) == 0       # the lock went with the first run


def test_a_resumed_output_with_a_doubled_row_is_refused(tiny_model_dir, tok, tmp_path, capsys):  # noqa: F811
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, _token_rows(tok, 3))
    assert cli.main(_args(tiny_model_dir, src, dst)) == 0
    lines = dst.read_text().splitlines(keepends=True)
    dst.write_text("".join(lines + [lines[1]]))                 # line 4 = line 2
    _write(src, _token_rows(tok, 4))
    capsys.readouterr()
    assert cli.main(_args(tiny_model_dir, src, dst)) == 2
    assert f"{dst}:4: id 'r1' is also on line 2 (a doubled row)" in _error(capsys)
    assert dst.read_text().count("\n") == 4                       # nothing appended


def test_parquet_output_with_a_doubled_row_is_refused(tiny_model_dir, tok, tmp_path, capsys):  # noqa: F811
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    _write(src, _token_rows(tok, 2))
    assert cli.main(_args(tiny_model_dir, src, dst)) == 0
    table = pq.read_table(dst)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]).replace_schema_metadata(table.schema.metadata), dst)
    capsys.readouterr()
    assert cli.main(_args(tiny_model_dir, src, dst)) == 2
    assert "id 'r0' is in rows 0 and 2 (a doubled row)" in _error(capsys)


def test_the_input_is_streamed_not_read_whole(tiny_model_dir, tok, tmp_path, capsys, no_model_load):  # noqa: F811
    """The checking pass holds one row at a time: on a 26 MB input whose last row is bad, Python's peak
    allocation stays far below the file's size (reading it whole, as before, holds it all, and all its rows)."""
    import tracemalloc

    src = tmp_path / "in.jsonl"
    row = {"prompt_ids": [5] * 40, "response_ids": [6] * 40, "note": "x" * 3000}
    with src.open("w") as f:
        for i in range(8000):
            f.write(json.dumps({"id": i, **row}) + "\n")
        f.write('{"id": 8000, "prompt_ids": [1], "response_ids": [-1]}\n')
    size = src.stat().st_size
    assert size > 24e6
    tracemalloc.start()
    try:
        assert cli.main(_args(tiny_model_dir, src, tmp_path / "out.jsonl")) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "in.jsonl:8001: response_ids[0] must be a token id" in _error(capsys)
    assert peak < size / 4, (peak, size)      # the ids seen (for duplicates) are all it keeps


def test_output_rows_keep_the_input_fields(tiny_model_dir, tok, tmp_path, capsys):  # noqa: F811
    """Extra input fields (reward, group, ...) are copied into the output rows after the computed columns, all
    of them or a named subset (`--keep reward,group`); Parquet types them from the whole input."""
    rows = [dict(r, reward=float(i) / 2, group=i % 2, meta={"n": i}) for i, r in enumerate(_token_rows(tok, 3))]
    rows[1]["reward"] = 1                                  # an int among floats: a float column
    src = tmp_path / "in.jsonl"
    _write(src, rows)
    computed = ["id", "prompt_length", "response_ids", "waad", "fai", "fai_valid", "gamma_coupled", "gamma_local",
                "gamma_global"]
    dst = tmp_path / "all.jsonl"
    assert cli.main(_args(tiny_model_dir, src, dst)) == 0
    out = _read(dst)
    assert [list(r) for r in out] == [computed + ["reward", "group", "meta"]] * 3
    assert [(r["reward"], r["group"], r["meta"]) for r in out] == [(0.0, 0, {"n": 0}), (1, 1, {"n": 1}),
                                                                     (1.0, 0, {"n": 2})]
    some = tmp_path / "some.jsonl"
    assert cli.main(_args(tiny_model_dir, src, some, "--keep", "group,reward")) == 0
    assert [list(r) for r in _read(some)] == [computed + ["group", "reward"]] * 3
    none = tmp_path / "none.jsonl"
    assert cli.main(_args(tiny_model_dir, src, none, "--keep", "none")) == 0
    assert [{k: r[k] for k in computed} for r in out] == _read(none)      # the computed columns are unchanged
    capsys.readouterr()
    assert cli.main(_args(tiny_model_dir, src, some, "--keep", "reward")) == 2     # another --keep: other settings
    assert 'keep: ["group", "reward"] there, ["reward"] now' in _error(capsys)
    assert cli.main(_args(tiny_model_dir, src, tmp_path / "x.jsonl", "--keep", "rewrd")) == 2
    assert "--keep: no row of" in _error(capsys)
    _write(src, [dict(rows[0], waad=1)])
    assert cli.main(_args(tiny_model_dir, src, tmp_path / "y.jsonl")) == 2
    assert "field 'waad' has the name of an output column" in _error(capsys)
    pq = pytest.importorskip("pyarrow.parquet")
    _write(src, rows)
    table_path = tmp_path / "out.parquet"
    assert cli.main(_args(tiny_model_dir, src, table_path)) == 0
    table = pq.read_table(table_path)
    assert table.column_names == computed + ["reward", "group", "meta"]
    assert [str(table.schema.field(k).type) for k in ("reward", "group", "meta")] == ["double", "int64", "string"]
    assert table.column("reward").to_pylist() == [0.0, 1.0, 1.0]
    assert [json.loads(m) for m in table.column("meta").to_pylist()] == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_checks_that_read_the_model_come_after_the_cheap_ones(tiny_model_dir, tmp_path, capsys,  # noqa: F811
                                                              monkeypatch, no_model_load):
    """A bad --output costs no config read (before: the architecture check read the checkpoint's config
    first: 13 s for the bundled GGUF); --layers beyond the model is refused from its config, before the
    weights load (before: after loading)."""
    import transformers as tf

    reads = []
    original = tf.AutoConfig.from_pretrained
    monkeypatch.setattr(tf.AutoConfig, "from_pretrained", lambda *a, **k: reads.append(a) or original(*a, **k))
    src = tmp_path / "in.jsonl"
    _write(src, [{"prompt_ids": [5, 6], "response_ids": [7, 8]}])
    assert cli.main(_args(tiny_model_dir, src, tmp_path / "o.csv")) == 2
    assert ".jsonl or .parquet" in _error(capsys) and reads == []
    assert cli.main(_args(tiny_model_dir, src, tmp_path / "o.jsonl", "--layers", "99")) == 2
    line = _error(capsys)
    assert "--layers 99: " in line and "has 6 layers (indices 0 to 5)" in line
    assert len(reads) == 1


def test_threads_flag_sets_torch_threads(tiny_model_dir, tok, tmp_path):  # noqa: F811
    src = tmp_path / "in.jsonl"
    _write(src, _token_rows(tok, 1))
    before = torch.get_num_threads()
    try:
        assert cli.main(_args(tiny_model_dir, src, tmp_path / "o.jsonl", "--threads", "1")) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
