"""``rhythm probe``: the statistics against hand-computed values and brute-force enumerations, the coupling
counts and Jaccard by hand, and the perturbation machinery on a tiny random model (the unperturbed replay
reproduces the original exactly, the token replaced is the one chosen, the sink share matches eager
attention), resume, the page and the command line."""
from __future__ import annotations

import itertools
import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from rhythm.app import cli  # noqa: E402
from rhythm.app.probe import stats  # noqa: E402
from rhythm.app.probe.prompts import BUILTIN, Prompt, PromptError, load_prompts  # noqa: E402
from rhythm.app.probe.run import ProbeError, ProbeSettings, run_probe  # noqa: E402
from rhythm.app.probe.summary import _lift  # noqa: E402
from rhythm.app.probe.text import content_words, jaccard  # noqa: E402
from rhythm.app.probe.trials import choose_positions, coupling_counts, waad_peaks  # noqa: E402
from tests.test_cli import tiny_model_dir  # noqa: E402,F401  (the saved tiny Llama + tokenizer)


# ---- statistics: hand-computed values ----------------------------------------------------------------------

def test_sign_test_hand_values():
    assert stats.sign_test(1, 9) == 22 / 1024            # 2 (C(10,0) + C(10,1)) / 2^10
    assert stats.sign_test(0, 6) == 2 / 64
    assert stats.sign_test(5, 5) == 1.0 and stats.sign_test(0, 0) == 1.0
    assert stats.sign_test(3, 1) == 2 * 5 / 16           # 2 (C(4,0) + C(4,1)) / 2^4


def _wilcoxon_brute(diffs):
    """Two-sided exact p by enumerating every sign pattern of the |d| ranks (ties: average ranks)."""
    d = [x for x in diffs if x != 0]
    a = sorted(abs(x) for x in d)
    rank = {v: (a.index(v) + 1 + len(a) - a[::-1].index(v)) / 2 for v in a}   # mean of first and last rank
    ranks = [rank[abs(x)] for x in d]
    w = sum(r for r, x in zip(ranks, d) if x > 0)
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(d))]
    low = sum(1 for s in sums if s <= w + 1e-9) / len(sums)
    high = sum(1 for s in sums if s >= w - 1e-9) / len(sums)
    return min(1.0, 2 * min(low, high)), w


def test_wilcoxon_exact_hand_values():
    assert stats.wilcoxon_signed_rank([1, 2, 3, 4, 5])["p"] == 2 / 32                 # W+ = 15: 1 of 32 patterns
    assert stats.wilcoxon_signed_rank([-1, 2, 3, 4, 5])["p"] == 2 * 2 / 32           # W+ = 14: {all, all but 1}
    r = stats.wilcoxon_signed_rank([0, 0, 1.5, -0.5, 2.5])                            # zeros dropped: n = 3
    assert r["n"] == 3 and r["w_plus"] == 5 and r["method"] == "exact"
    assert r["p"] == 2 * 2 / 8                                                        # W+ >= 5 of {0..6}: {5, 6}
    assert stats.wilcoxon_signed_rank([0.0, 0.0]) == {"n": 0, "w_plus": 0.0, "p": 1.0, "method": "none"}


@pytest.mark.parametrize("seed", range(8))
def test_wilcoxon_exact_matches_enumeration_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 4 + seed
    diffs = (torch.randint(-4, 5, (n,), generator=gen) / 4).tolist()      # many ties and some zeros
    want_p, want_w = _wilcoxon_brute(diffs)
    got = stats.wilcoxon_signed_rank(diffs)
    assert got["w_plus"] == want_w
    assert abs(got["p"] - want_p) < 1e-12


def test_wilcoxon_normal_approximation_hand_value():
    # d = 1..60, the first 20 negative: W+ = 21 + ... + 60 = 1620, E = 60 * 61 / 4 = 915,
    # Var = 60 * 61 * 121 / 24 = 18452.5, z = (1620 - 915 - 0.5) / sqrt(18452.5) = 5.186249, p = erfc(z / sqrt 2)
    diffs = [-i for i in range(1, 21)] + list(range(21, 61))
    r = stats.wilcoxon_signed_rank(diffs)
    assert r["method"] == "normal" and r["w_plus"] == 1620
    assert abs(r["p"] - 2.145715e-07) < 1e-12
    # ties: 51 differences of +-1 (one tie group of 51, rank 26 each), 40 positive: W+ = 1040, E = 663,
    # Var = 51 * 52 * 103 / 24 - (51^3 - 51) / 48 = 11381.5 - 2762.5 = 8619, z = 376.5 / 92.839 = 4.055427
    r = stats.wilcoxon_signed_rank([1.0] * 40 + [-1.0] * 11)
    assert r["w_plus"] == 1040 and abs(r["p"] - 5.004290e-05) < 1e-10


def test_wilcoxon_normal_is_close_to_exact_at_the_switch():
    gen = torch.Generator().manual_seed(3)
    diffs = (torch.randn(50, generator=gen) + 0.3).tolist()
    exact = stats.wilcoxon_signed_rank(diffs)["p"]
    normal = stats.wilcoxon_signed_rank(diffs + [0.0] * 0 + [1e9])      # n = 51: normal approximation
    assert stats.wilcoxon_signed_rank(diffs)["method"] == "exact" and normal["method"] == "normal"
    assert abs(exact - normal["p"]) < 0.05


def test_clopper_pearson_hand_values():
    lo, hi = stats.clopper_pearson(0, 10)
    assert lo == 0.0 and abs(hi - (1 - 0.025 ** 0.1)) < 1e-12            # 0.308497
    lo, hi = stats.clopper_pearson(10, 10)
    assert hi == 1.0 and abs(lo - 0.025 ** 0.1) < 1e-12
    lo, hi = stats.clopper_pearson(5, 10)                                 # textbook table: 0.1871, 0.8129
    assert abs(lo - 0.187086) < 1e-6 and abs(hi - 0.812914) < 1e-6
    assert stats.clopper_pearson(0, 0) is None


def test_median_ci_hand_values():
    # n = 10: P(B <= 1) = 11/1024 <= 0.025 < P(B <= 2) = 56/1024, so [v_(2), v_(9)], coverage 1 - 22/1024
    ci = stats.median_ci([float(x) for x in [9, 1, 8, 2, 7, 3, 6, 4, 5, 10]])
    assert ci == {"low": 2.0, "high": 9.0, "coverage": 1 - 22 / 1024}
    # n = 6: P(B <= 0) = 1/64 <= 0.025: [v_(1), v_(6)], coverage 62/64; n = 5: 1/32 > 0.025, no interval
    assert stats.median_ci([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == {"low": 1.0, "high": 6.0, "coverage": 62 / 64}
    assert stats.median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None


def test_bootstrap_and_spearman():
    assert stats.bootstrap_mean_ci([0.5] * 7) == (0.5, 0.5)
    values = [0.1, 0.4, 0.2, 0.9, 0.3, 0.6]
    lo, hi = stats.bootstrap_mean_ci(values, seed=1)
    assert stats.bootstrap_mean_ci(values, seed=1) == (lo, hi) and lo < sum(values) / 6 < hi
    assert stats.bootstrap_mean_ci([]) is None
    # ranks of y = [5, 6, 7, 8, 7]: [1, 2, 3.5, 5, 3.5]; rho = 8 / sqrt(10 * 9.5)
    assert abs(stats.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) - 8 / math.sqrt(95)) < 1e-12
    assert stats.spearman([1, 2, 3], [4, 4, 4]) is None and stats.spearman([1, 2], [1, 2]) is None


def test_hypergeometric_tail_hand_values():
    assert stats.hypergeometric_pmf(10, 3, 4)[0] == math.comb(7, 4) / math.comb(10, 4)      # 35 / 210
    assert abs(stats.hypergeometric_tail([(4, 1, 1), (4, 1, 1)], 2) - 1 / 16) < 1e-15
    assert abs(stats.hypergeometric_tail([(4, 1, 1), (4, 1, 1)], 1) - 7 / 16) < 1e-15
    assert stats.hypergeometric_tail([(4, 1, 1)], 0) == 1.0
    # drawing 2 of 5 with 2 marked: P(X = 2) = 1 / C(5, 2)
    assert abs(stats.hypergeometric_tail([(5, 2, 2)], 2) - 0.1) < 1e-15


def test_paired_summary_counts():
    a, b = [0.25, 0.5, 0.5, 0.75, 0.0], [0.5, 0.5, 0.25, 1.0, 0.5]   # d = -0.25, 0, 0.25, -0.25, -0.5
    s = stats.paired_summary(a, b)
    assert (s["n"], s["n_less"], s["n_greater"], s["n_ties"]) == (5, 3, 1, 1)
    assert s["share_less"] == 0.6 and s["sign_p"] == 2 * 5 / 16 and s["mean_diff"] == -0.15
    assert s["median_diff"] == -0.25
    # |d| ranks: 0.25 x3 -> 2 each, 0.5 -> 4; W+ = 2 (the +0.25)
    assert s["w_plus"] == 2 and s["wilcoxon_method"] == "exact"
    with pytest.raises(ValueError, match="paired"):
        stats.paired_summary([1.0], [1.0, 2.0])


# ---- coupling, peaks, Jaccard, positions ----------------------------------------------------------------

def test_waad_peaks_and_coupling_by_hand():
    assert waad_peaks([0, 1, 3, 2, 2, 5, 1]) == [False, False, True, False, False, True, False]
    peaks = [j in (2, 5) for j in range(10)]
    anchors = [j in (3, 6) for j in range(10)]
    c = coupling_counts(peaks, anchors, [True] * 10)
    assert c["N"] == 10 and c["n"] == 2
    assert c["by_offset"]["1"] == [2, 2] and c["by_offset"]["0"] == [2, 0] and c["by_offset"]["-3"] == [1, 0]
    assert c["near"] == [6, 2]                  # targets {2, 3, 4, 5, 6, 7}
    lift = _lift([(10, 2, 6, 2)])               # expected 2 * 6 / 10 = 1.2
    assert lift["expected"] == 1.2 and abs(lift["lift"] - 2 / 1.2) < 1e-12
    assert abs(lift["p"] - math.comb(6, 2) / math.comb(10, 2)) < 1e-15     # both anchors on targets
    # ineligible targets do not count
    assert coupling_counts(peaks, anchors, [j != 3 for j in range(10)])["by_offset"]["1"] == [1, 1]


def test_content_word_jaccard():
    assert content_words("The cat sat on 3.5 mats, didn't it?") == {"cat", "sat", "3.5", "mats"}
    assert abs(jaccard("The cat sat on 3 mats", "the dog sat on 3.5 mats") - 2 / 6) < 1e-15
    assert jaccard("the and of", "") == 1.0 and jaccard("apples", "") == 0.0


def test_choose_positions_ties_and_seed():
    fai = [0.5, 0.1, 0.5, 0.9, 0.1, 0.3]
    chosen = choose_positions(fai, [True] * 5 + [False], 2, "s")
    assert chosen["high"] == [3, 0] and chosen["low"] == [1, 4]       # ties to the lower position
    assert chosen == choose_positions(fai, [True] * 5 + [False], 2, "s")
    assert all(j < 5 for j in chosen["random"]) and len(set(chosen["random"])) == 2
    assert choose_positions(fai, [True, True, True, False, False, False], 2, "s") is None


# ---- prompts ---------------------------------------------------------------------------------------------

def test_builtin_prompts_and_files(tmp_path):
    assert len(BUILTIN) >= 30 and len({p.text for p in BUILTIN}) == len(BUILTIN)
    assert len({p.id for p in BUILTIN}) == len(BUILTIN)
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  second  \n", encoding="utf-8")
    assert load_prompts(str(txt))[0] == [Prompt(1, "first"), Prompt(3, "second")]
    good = tmp_path / "p.jsonl"
    good.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y", "other": 1}\n', encoding="utf-8")
    assert load_prompts(str(good))[0] == [Prompt("a", "x"), Prompt("b", "y")]
    for text, message in [('{"prompt": ""}', "non-empty"), ('[1]', "JSON object"), ("{", "not a JSON"),
                          ('{"id": 1, "prompt": "x"}\n{"prompt": "y"}', "every line"),
                          ('{"id": 1, "prompt": "x"}\n{"id": 1, "prompt": "y"}', "already used"),
                          ('{"id": 1, "prompt": "x"}\n{"id": "2", "prompt": "y"}', "all be ints")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(PromptError, match=message):
            load_prompts(str(bad))
    with pytest.raises(PromptError, match="neither"):
        load_prompts(str(tmp_path / "missing.jsonl"))


# ---- the machinery on a tiny random model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):  # noqa: F811
    from rhythm.models import load_model

    return load_model(tiny_model_dir)


PROMPTS = [Prompt(f"p{i}", text) for i, text in enumerate([
    "Natalia sold 48 clips in April. How many in May?", "She sold half as many clips in May.",
    "How many clips did Natalia sell altogether?"])]


@pytest.fixture(scope="module")
def probed(tiny):
    model, tokenizer = tiny
    return run_probe(model, tokenizer, PROMPTS, settings=ProbeSettings(k=2, min_after=8, max_new_tokens=40,
                                                                        batch_size=8))


def test_replay_reproduces_the_original_exactly(probed, tiny):
    from rhythm.app.probe.generate import greedy

    model, tokenizer = tiny
    replays = [t for r in probed["records"] for t in r["trials"] if t["kind"] == "replay"]
    assert len(replays) == len(PROMPTS) and all(t["identical"] for t in replays)
    assert probed["summary"]["perturbation"]["replay"] == {"n": 3, "identical": 3}
    # and directly: every prefix of a response, in one padded batch with rows of other lengths
    record = probed["records"][0]
    prompt_ids = [int(i) for i in _prompt_ids(tokenizer, record["prompt"])]
    response = record["response_ids"]
    cuts = [1, 5, 17, len(response) - 3]
    rows = [prompt_ids + response[: j + 1] for j in cuts]
    out = greedy(model, tokenizer, rows, [len(response) - j - 1 for j in cuts], batch_size=4)
    assert out == [response[j + 1:] for j in cuts]


def _prompt_ids(tokenizer, text):
    from rhythm.app.probe.run import encode

    return encode(tokenizer, text, True)


def test_the_token_replaced_is_the_one_chosen(probed, tiny):
    model, tokenizer = tiny
    checked = 0
    for record in probed["records"]:
        prompt_ids = _prompt_ids(tokenizer, record["prompt"])
        response = record["response_ids"]
        ids = torch.tensor([prompt_ids + response])
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        p = len(prompt_ids)
        fai, valid = record["signals"]["fai"], record["signals"]["fai_valid"]
        eligible = [j for j, v in enumerate(valid) if v and j + 8 <= len(response) - 1]   # min_after = 8
        for t in record["trials"]:
            j = t["position"]
            assert t["original_id"] == response[j]
            if t["kind"] == "replay":
                assert t["replacement_id"] == response[j]
                continue
            order = torch.argsort(logits[p + j - 1], descending=True, stable=True).tolist()
            assert t["replacement_id"] == next(i for i in order if i != response[j])   # second most likely
            assert t["replacement_id"] != response[j]
            if t["rank"]:
                continue
            # the continuation is plain greedy decoding after the replaced token (one row, no padding)
            prefix = torch.tensor([prompt_ids + response[:j] + [t["replacement_id"]]])
            with torch.no_grad():
                gen = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=False,
                                     max_new_tokens=len(response) - j - 1, pad_token_id=tokenizer.pad_token_id)
            want = gen[0, prefix.shape[1]:].tolist()
            if tokenizer.eos_token_id in want:
                want = want[: want.index(tokenizer.eos_token_id) + 1]
            assert t["continuation_ids"] == want
            checked += 1
        ranked = sorted(eligible, key=lambda j: (-fai[j], j))
        highs = [t["position"] for t in record["trials"] if t["kind"] == "high"]
        lows = [t["position"] for t in record["trials"] if t["kind"] == "low"]
        assert highs == ranked[:2] and lows == sorted(eligible, key=lambda j: (fai[j], j))[:2]
    assert checked == 3 * 3


def test_signals_and_sink_share_match_eager_attention(probed, tiny_model_dir):  # noqa: F811
    """Sink share and sink-free distance from eager attention maps (materialised by transformers)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    record = probed["records"][1]
    prompt_ids = _prompt_ids(tokenizer, record["prompt"])
    ids = torch.tensor([prompt_ids + record["response_ids"]])
    p, length = len(prompt_ids), ids.shape[1]
    with torch.no_grad():
        maps = model(ids, output_attentions=True).attentions
    heads = record["heads"]
    t = torch.arange(p, length, dtype=torch.float64)
    s = torch.arange(length, dtype=torch.float64)
    for flat in range(len(heads["sink"])):
        layer = heads["layers"][flat // heads["heads_per_layer"]]
        a = maps[layer][0, flat % heads["heads_per_layer"]].double()[p:]        # [R, T]
        assert abs(a[:, 0].mean().item() - heads["sink"][flat]) < 1e-5
        dist = (a * (t[:, None] - s[None, :]).clamp(min=0)).sum(-1)
        assert abs(dist.mean().item() - heads["distance"][flat]) < 1e-3
        no_sink = ((a[:, 1:] * (t[:, None] - s[None, 1:])).sum(-1) / a[:, 1:].sum(-1)).mean().item()
        assert abs(no_sink - heads["distance_no_sink"][flat]) < 1e-3


def test_resume_appends_and_summarises_like_one_run(tiny, tmp_path):
    model, tokenizer = tiny
    settings = ProbeSettings(k=1, max_new_tokens=40, batch_size=8)   # groups of 2 prompts
    out = tmp_path / "run"
    run_probe(model, tokenizer, PROMPTS[:2], settings=settings, out=out)
    journal = out / "probe_trials.jsonl"
    assert len(journal.read_text().splitlines()) == 2
    calls = []
    resumed = run_probe(model, tokenizer, PROMPTS, settings=settings, out=out, progress=calls.append)
    assert calls == [2, 1] and len(journal.read_text().splitlines()) == 3
    fresh = run_probe(model, tokenizer, PROMPTS, settings=settings, out=tmp_path / "fresh")
    assert resumed["summary"] == fresh["summary"]
    assert json.loads((out / "probe.json").read_text())["summary"] == json.loads(json.dumps(fresh["summary"]))
    with pytest.raises(ProbeError, match="other settings"):
        run_probe(model, tokenizer, PROMPTS, settings=ProbeSettings(k=2, max_new_tokens=40, batch_size=8), out=out)
    with pytest.raises(ProbeError, match="another text"):
        run_probe(model, tokenizer, [Prompt("p0", "changed")], settings=settings, out=out)
    # a killed write: the torn last record is cut and that prompt runs again; an edited line is refused
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:50])
    again = run_probe(model, tokenizer, PROMPTS, settings=settings, out=out)
    assert len(journal.read_text().splitlines()) == 3 and again["summary"] == resumed["summary"]
    journal.write_bytes(b"\n".join(lines[:1]) + b"\n{not json}\n" + lines[2] + b"\n")
    with pytest.raises(ProbeError, match=":2: not a complete probe record"):
        run_probe(model, tokenizer, PROMPTS, settings=settings, out=out)


def test_journal_repairs_its_tail_and_refuses_edited_lines(tmp_path):
    """The journal alone (no model): a complete last record without its newline is kept (the newline added), a
    torn one is cut off, blank lines are skipped, an unreadable line is refused by its number."""
    from rhythm.app.probe.journal import Journal

    path = tmp_path / "probe_trials.jsonl"
    one, two = b'{"id": "a", "prompt": "x", "n": 1}', b'{"id": "b", "prompt": "y", "n": 2}'
    Journal(path, {"k": 1})                                        # stores the settings; no records yet
    path.write_bytes(one + b"\n\n" + two)                          # complete, no newline at the end
    assert Journal(path, {"k": 1}).records == {"a": {"id": "a", "prompt": "x", "n": 1},
                                               "b": {"id": "b", "prompt": "y", "n": 2}}
    assert path.read_bytes() == one + b"\n\n" + two + b"\n"
    for torn in (two[:-1], b'{"id": "b"}', b"\xff\xfe"):           # cut JSON, a record missing "prompt", not UTF-8
        path.write_bytes(one + b"\n" + torn)
        assert list(Journal(path, {"k": 1}).records) == ["a"]
        assert path.read_bytes() == one + b"\n"
    path.write_bytes(one + b"\n" + b'{"id": "b"}' + b"\n" + two + b"\n")
    with pytest.raises(ProbeError, match=r"probe_trials.jsonl:2: not a complete probe record .* another --out$"):
        Journal(path, {"k": 1})


def test_journal_resume_errors_name_the_out_flag(tmp_path):
    """Resume refusals from the settings rule name the probe's flag, --out (they said --output, rhythm score's)."""
    from rhythm.app.probe.journal import Journal

    path = tmp_path / "probe_trials.jsonl"
    Journal(path, {"k": 1}).append([{"id": "a", "prompt": "x"}])
    settings = tmp_path / "probe_trials.jsonl.settings.json"
    cases = []
    with pytest.raises(ProbeError) as other:
        Journal(path, {"k": 2})
    cases.append(other)
    settings.write_text("not json")
    with pytest.raises(ProbeError) as unreadable:
        Journal(path, {"k": 1})
    cases.append(unreadable)
    settings.unlink()
    with pytest.raises(ProbeError) as missing:
        Journal(path, {"k": 1})
    cases.append(missing)
    settings.mkdir()
    with pytest.raises(ProbeError) as folder:
        Journal(path, {"k": 1})
    cases.append(folder)
    assert "other settings (k: 1 there, 2 now)" in str(other.value)
    assert "not a settings file written by rhythm probe" in str(unreadable.value)
    assert "no record of the settings" in str(missing.value)
    assert "is a folder, not a regular file" in str(folder.value)
    for case in cases:
        message = str(case.value)
        assert message.startswith("--out: ") and "choose another --out" in message.replace("write to", "choose")
        assert "--output" not in message, message


def test_cli_probe_writes_json_and_escaped_page(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "mine.jsonl"
    nasty = "<script>alert(1)</script> & \x1b[31m how many apples?"
    prompts.write_text(json.dumps({"id": "x<b>\x1b", "prompt": nasty}) + "\n"
                       + json.dumps({"id": "y", "prompt": "Tom has 3 apples and buys 4. How many now?"}) + "\n",
                       encoding="utf-8")
    out = tmp_path / "probe"
    assert cli.main(["probe", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--trials", "1",
                     "--max-new-tokens", "40", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "Jaccard high-FAI vs low-FAI" in text and "\x1b" not in text
    result = json.loads((out / "probe.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in result["records"]] == ["x<b>\x1b", "y"]
    page = (out / "probe.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "http" not in page and "<script" not in page
    assert "&lt;script&gt;" in page and "x&lt;b&gt;" in page and "\x1b" not in page.replace("\\x1b", "")
    assert page.count('src="data:image/png;base64,') == 2 and "0.534" in page and "87.14%" in page


def test_cli_probe_refuses_bad_input_before_loading(tmp_path, capsys):
    assert cli.main(["probe", "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "neither 'builtin' nor an existing file" in capsys.readouterr().err
    assert cli.main(["probe", "--trials", "0"]) == 2
    assert "--trials" in capsys.readouterr().err


def test_summary_and_page_without_any_trial():
    """Every prompt skipped (empty responses): the statistics say n = 0 and the page still renders."""
    from rhythm.app.probe.page import probe_html
    from rhythm.app.probe.summary import summarize

    records = [{"id": i, "prompt": "<x>", "prompt_tokens": 3, "response": "", "response_ids": [],
                "skipped": "empty response", "trials": None, "coupling": None, "entropy": None, "heads": None}
               for i in range(2)]
    summary = summarize(records)
    assert summary["perturbation"]["high_vs_low"]["n"] == 0 and summary["perturbation"]["high_vs_low"]["sign_p"] == 1.0
    assert summary["coupling"]["waad_peaks"]["near"]["lift"] is None and summary["heads"] == {"responses": 0}
    page = probe_html({"settings": {"probe": {"k": 2}, "scorer": {}, "model": "m"}, "summary": summary,
                       "records": records})
    assert "empty response" in page and "&lt;x&gt;" in page and page.count("data:image/png") == 1
