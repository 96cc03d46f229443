"""The ``rhythm`` CLI on a tiny local model directory (random Llama + a small BPE tokenizer, saved to disk):
``analyze`` writes the HTML/PNG/JSON report, ``score`` writes per-token rows and resumes by id."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from rhythm.app import cli

CORPUS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
          "How many clips did Natalia sell altogether in April and May? Think step by step.",
          "In April she sold 48 clips. In May she sold 48 / 2 = 24 clips. Altogether 48 + 24 = 72."] * 3
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny LlamaForCausalLM with its tokenizer and chat template (offline, ~1 s)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def save_tiny_model(path):
    """Save the tiny random Llama (6 layers, 4 heads, 512 positions) and its BPE tokenizer into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<|im_end|>",
                                               pad_token="<|im_end|>", bos_token="<|im_start|>")
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      initializer_range=0.3, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_analyze_writes_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "reports"
    assert cli.main(["analyze", "--model", str(tiny_model_dir), "--max-new-tokens", "40", "--out", str(out),
                     "--no-color"]) == 0
    text = capsys.readouterr().out
    assert "strongest anchors:" in text and "report:" in text
    html = (out / "rhythm.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    assert "<script src" not in html and "<link" not in html and "http" not in html  # self-contained
    assert html.count('class="tok') > 40 and 'title="pos ' in html and "WAAD" in html and "FAI" in html
    assert "tok pre" in html and ("tok anc" in html or "tok dom" in html)
    for strategy in ("coupled", "local", "global", "random", "entropy"):
        assert f"<b>{strategy}</b>" in html
    png = (out / "rhythm.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    data = json.loads((out / "rhythm.json").read_text())
    n = len(data["tokens"])
    assert len(data["waad"]) == n and len(data["gammas"]["coupled"]) == n
    assert any(data["preplan"]) and any(data["anchor"])


def _rollouts(path, tok, n=5):
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"id": f"r{i}", "prompt": CORPUS[i % 3], "response": CORPUS[(i + 1) % 3][: 30 + 10 * i]})
        else:
            rows.append({"id": f"r{i}", "prompt_ids": tok(CORPUS[i % 3]).input_ids[: 8 + i],
                         "response_ids": tok(CORPUS[2]).input_ids[: 12 + 3 * i]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_score_jsonl_and_resume(tiny_model_dir, tmp_path, capsys):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    src, dst = tmp_path / "rollouts.jsonl", tmp_path / "out.jsonl"
    rows = _rollouts(src, tok)
    args = ["score", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(dst),
            "--micro-batch-size", "2", "--strategies", "coupled,local,global,random"]
    assert cli.main(args) == 0
    out = _read_jsonl(dst)
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    for r in out:
        n = len(r["response_ids"])
        assert n > 0 and all(len(r[key]) == n for key in ("waad", "fai", "fai_valid", "gamma_coupled", "gamma_random"))
        assert all(g >= 1 for g in r["gamma_coupled"]) and max(r["gamma_local"]) == 1.5
    first = {r["id"]: r for r in out}

    # an interrupted run: the last micro-batch is lost and a torn half line is left behind
    lines = dst.read_text().splitlines(keepends=True)
    dst.write_text("".join(lines[:3]) + lines[3][:25])
    assert cli.main(args) == 0
    again = _read_jsonl(dst)
    assert sorted(r["id"] for r in again) == sorted(first)        # no duplicates, nothing lost
    for r in again:
        assert r["gamma_coupled"] == first[r["id"]]["gamma_coupled"]
        torch.testing.assert_close(torch.tensor(r["waad"]), torch.tensor(first[r["id"]]["waad"]), atol=1e-5, rtol=0)
    capsys.readouterr()
    assert cli.main(args) == 0                                      # all done: skips without loading the model
    assert "nothing to do" in capsys.readouterr().err                 # messages go to stderr


def test_score_parquet(tiny_model_dir, tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    src, dst = tmp_path / "rollouts.jsonl", tmp_path / "out.parquet"
    _rollouts(src, tok, n=3)
    args = ["score", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(dst)]
    assert cli.main(args) == 0
    table = pq.read_table(dst)
    assert table.num_rows == 3 and "gamma_coupled" in table.column_names
    assert not (tmp_path / "out.parquet.partial.jsonl").exists()


def test_score_parquet_without_pyarrow(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Without pyarrow, a Parquet output is a one-line error (exit 2), whether or not pyarrow is installed."""
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    src, dst = tmp_path / "rollouts.jsonl", tmp_path / "out.parquet"
    _rollouts(src, tok, n=3)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    args = ["score", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(dst)]
    assert cli.main(args) == 2 and "pyarrow" in capsys.readouterr().err


def test_score_bad_rows(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"id": 1, "text": "no prompt"}) + "\n")
    assert cli.main(["score", "--model", str(tiny_model_dir), "--input", str(src), "--output",
                     str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:1: needs 'prompt' and 'response'" in capsys.readouterr().err
    assert cli.main(["score", "--input", str(src), "--output", str(tmp_path / "o.csv")]) == 2
    assert ".jsonl or .parquet" in capsys.readouterr().err


# ---- analyze: checks before the model loads, stdin, sampling (issues 19 and 26) --------------------------------

@pytest.fixture
def no_load(monkeypatch):
    from rhythm import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def _one_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name", ["../../x", "sub/x", "..", "", "/tmp/x"])
def test_analyze_name_is_a_plain_file_stem(tiny_model_dir, tmp_path, capsys, no_load, name):
    out = tmp_path / "a" / "b" / "reports"
    assert cli.main(["analyze", "--model", str(tiny_model_dir), "--out", str(out), "--name", name]) == 2
    assert "--name must be a plain file stem" in _one_error(capsys)
    assert not list(tmp_path.rglob("x.*"))


def test_analyze_checks_layers_and_row_length_before_the_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                     no_load):
    out = str(tmp_path / "rep")
    assert cli.main(["analyze", "--model", str(tiny_model_dir), "--out", out, "--layers", "2", "99"]) == 2
    assert "--layers 99: " in _one_error(capsys)
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"prompt_ids": [5] * 300, "response_ids": [6] * 300}) + "\n")
    assert cli.main(["analyze", "--model", str(tiny_model_dir), "--out", out, "--input", str(src)]) == 2
    assert "300 prompt + 300 response tokens exceed the model's max_position_embeddings = 512" in _one_error(capsys)
    assert cli.main(["analyze", "--model", str(tiny_model_dir), "--out", out, "--max-new-tokens", "600"]) == 2
    assert "exceed the model's max_position_embeddings = 512" in _one_error(capsys)


def test_analyze_reads_stdin_and_samples_at_the_temperature(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`--input -` reads the rollouts from stdin like `rhythm score`; `--temperature T` samples the generation
    from softmax(logits / T) seeded by --seed (reproducible), where it was greedy whatever T was."""
    import io

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {"id": "a", "prompt_ids": tok(CORPUS[0]).input_ids[:8], "response_ids": tok(CORPUS[2]).input_ids[:16]}
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((json.dumps(row) + "\n").encode())))
    out = tmp_path / "stdin"
    assert cli.main(["analyze", "--model", str(tiny_model_dir), "--input", "-", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "rhythm.json").read_text())
    assert data["response_start"] == 8 and len(data["tokens"]) == 24
    generated = {}
    threads = torch.get_num_threads()
    for name, flags in (("greedy", []), ("t1", ["--temperature", "1.3", "--seed", "4"]),
                        ("t2", ["--temperature", "1.3", "--seed", "4"]), ("t3", ["--temperature", "1.3"])):
        assert cli.main(["analyze", "--model", str(tiny_model_dir), "--max-new-tokens", "24", "--out",
                         str(tmp_path / name), "--quiet", "--threads", "1", *flags]) == 0
        generated[name] = json.loads((tmp_path / name / "rhythm.json").read_text())["tokens"]
        assert torch.get_num_threads() == 1
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert generated["t1"] == generated["t2"] != generated["greedy"]
    assert generated["t3"] != generated["t1"]                # another seed, another sample
