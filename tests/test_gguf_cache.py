"""The GGUF cache of rhythm.models: a GGUF file is de-quantised once into $RHYTHM_CACHE_DIR (keyed by the
file's sha256), later loads read the converted folder and give the same model, two processes converting at
once take turns, and no GGUF progress bar reaches a non-terminal stderr with --quiet (issues 19 item 14,
26 item 7). On a tiny GGUF written here from the tiny Llama of tests/test_cli.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from rhythm import models  # noqa: E402
from tests.test_cli import CORPUS, save_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_gguf(model_dir: Path, out: Path) -> Path:
    """The saved tiny Llama + tokenizer as an F32 GGUF file (llama architecture, gpt2 BPE tokenizer)."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tok))
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda item: item[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), value.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gguf")
    return write_gguf(save_tiny_model(folder / "hf"), folder / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def parses(monkeypatch):
    """Counts the reads of a GGUF file by transformers (metadata or tensors)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    calls = []
    original = gguf_utils.load_gguf_checkpoint
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    return calls


def test_converted_once_then_read_from_the_cache(tiny_gguf, cache, parses):
    model, tok = models.load_model(tiny_gguf, quiet=True)
    (folder,) = [p for p in (cache / "gguf").iterdir() if p.is_dir()]
    assert folder.name == models.gguf_cache_key(tiny_gguf) and (folder / "config.json").is_file()
    assert parses                                        # the conversion read the GGUF
    parses.clear()
    again, tok2 = models.load_model(tiny_gguf, quiet=True)
    assert parses == []                                  # the second load never touches the GGUF
    direct = models._load_gguf(tiny_gguf, quiet=True).eval()
    for (name, a), (_, b), (_, c) in zip(model.state_dict().items(), again.state_dict().items(),
                                         direct.state_dict().items()):
        assert torch.equal(a, b) and torch.equal(a, c), name
    ids = torch.tensor([tok(CORPUS[0]).input_ids])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, direct(ids).logits)
    assert tok(CORPUS[1]).input_ids == tok2(CORPUS[1]).input_ids and tok2.chat_template == tok.chat_template
    assert getattr(again, "hf_quantizer", None) is None  # a plain model a Trainer accepts


def _score(argv, env_cache, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", RHYTHM_CACHE_DIR=str(env_cache))
    return subprocess.Popen([sys.executable, "-m", "rhythm.app.cli", "score", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_score_rows_equal_with_and_without_the_cache_and_two_processes_convert_once(tiny_gguf, tmp_path):
    """Two `rhythm score --quiet` started together on a cold cache: one converts, the other waits and reads the
    result; their rows equal those of a run that cannot cache (loads the GGUF directly), bitwise; with --quiet
    and stderr not a terminal, nothing reaches stderr (no de-quantisation bar)."""
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gguf.parent / "hf")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": CORPUS[i], "response": CORPUS[2][: 20 + 9 * i]}) + "\n"
                           for i in range(3)) + json.dumps({"id": 9, "prompt_ids": tok(CORPUS[0]).input_ids[:7],
                                                            "response_ids": [5, 6, 7, 8]}) + "\n")
    cache = tmp_path / "cache"
    runs = [_score(["--model", str(tiny_gguf), "--input", str(src), "--output", str(tmp_path / f"o{i}.jsonl"),
                    "--quiet", "--strategies", "coupled,random"], cache) for i in range(2)]
    for proc in runs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and err == b"", err.decode()
    assert len([p for p in (cache / "gguf").iterdir() if p.is_dir()]) == 1
    assert not list((cache / "gguf").glob(".*tmp*"))
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")                               # the cache cannot be created: the GGUF loads directly
    proc = _score(["--model", str(tiny_gguf), "--input", str(src), "--output", str(tmp_path / "direct.jsonl"),
                   "--strategies", "coupled,random"], blocked)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "cannot cache the converted model" in err.decode()
    rows = [(tmp_path / name).read_text() for name in ("o0.jsonl", "o1.jsonl", "direct.jsonl")]
    assert rows[0] == rows[1] == rows[2] and rows[0].count("\n") == 4
