"""The report: exact attention bands from q, k and lse, GRPO group advantages, ``rhythm analyze --input --id``
and a self-contained HTML page (pictures inlined, newlines visible, values printed)."""
from __future__ import annotations

import base64
import json
import re
import shutil

import pytest
import torch

from rhythm import attention_metrics
from rhythm.report.band import band_attention
from rhythm.report.groups import grpo_advantages


def _materialised(q, k, scale, softcap=None, window=None, chunk=None):
    """Per-head softmax over visible keys, written straight from docs/definitions.md section 2 (fp64)."""
    q, k = q.double(), k.double()
    length = q.shape[1]
    scores = scale * q @ k.transpose(-1, -2)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    t = torch.arange(length)[:, None]
    s = torch.arange(length)[None, :]
    visible = s <= t
    if window:
        visible &= t - s < window
    if chunk:
        visible &= t // chunk == s // chunk
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.logsumexp(scores, -1), torch.softmax(scores, -1)


@pytest.mark.parametrize("mechanism", [{}, {"softcap": 5.0}, {"sliding_window": 7}, {"chunk_size": 16}])
def test_band_matches_materialised_attention(mechanism):
    class Layer:
        softcap = mechanism.get("softcap")
        sliding_window = mechanism.get("sliding_window")
        chunk_size = mechanism.get("chunk_size")

    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 45, 8, generator=gen) * 1.5, torch.randn(3, 45, 8, generator=gen) * 1.5
    scale = 8 ** -0.5
    lse, attn = _materialised(q, k, scale, Layer.softcap, Layer.sliding_window, Layer.chunk_size)
    lags = range(2, 20)
    by_query = band_attention(q, k, lse.float(), lags=lags, scale=scale, layer=Layer)
    by_key = band_attention(q, k, lse.float(), lags=lags, scale=scale, anchor="key", layer=Layer)
    for j, lag in enumerate(lags):
        for t in range(45):
            want_q = attn[:, t, t - lag] if t - lag >= 0 else torch.zeros(3, dtype=torch.float64)
            want_k = attn[:, t + lag, t] if t + lag < 45 else torch.zeros(3, dtype=torch.float64)
            assert torch.allclose(by_query[:, t, j].double(), want_q, atol=1e-6)
            assert torch.allclose(by_key[:, t, j].double(), want_k, atol=1e-6)


def test_bands_reproduce_waad_and_fai():
    """W lags of the query band give WAAD; the FAI horizon band's column sums over |T(s)| give FAI."""
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 60, 16, generator=gen) * 1.5, torch.randn(1, 2, 60, 16, generator=gen) * 1.5
    window, (h_lo, h_hi), r0 = 6, (3, 12), 20
    m = attention_metrics(q, k, window=window, horizon=(h_lo, h_hi), response_start=r0, backend="reference")
    scale = 16 ** -0.5
    band = band_attention(q[0], k[0], m.lse[0], lags=range(window), scale=scale)
    lag = torch.arange(window, dtype=torch.float32)
    waad = (band * lag).sum(-1) + window * (1 - band.sum(-1))
    assert (waad - m.waad[0]).abs().max() < 1e-4
    cols = band_attention(q[0], k[0], m.lse[0], lags=range(h_lo, h_hi + 1), scale=scale, anchor="key")
    s = torch.arange(60)[:, None]
    rows = s + torch.arange(h_lo, h_hi + 1)[None, :]
    in_t = (rows >= r0) & (rows < 60)
    count = in_t.sum(-1)
    fai = torch.where(count > 0, (cols * in_t).sum(-1) / count.clamp(min=1), 0.0)
    assert (fai - m.fai[0]).abs().max() < 1e-5


def test_grpo_advantages_as_trl():
    rewards = [1.0, 0.0, 0.5, 1.0]
    r = torch.tensor(rewards)
    want = (r - r.mean()) / (r.std() + 1e-4)
    assert torch.allclose(torch.tensor(grpo_advantages(rewards)), want, atol=1e-6)
    assert grpo_advantages([2.0]) == [0.0]


# ---- the CLI on the tiny model of tests/test_cli.py -------------------------------------------------------

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from rhythm.app import cli

from .test_cli import CORPUS, tiny_model_dir  # noqa: E402,F401  (the fixture)


def _images(page: str) -> list[str]:
    return re.findall(r'<img[^>]*src="([^"]*)"', page)


def test_analyze_existing_rollout(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """One run of ``rhythm analyze --input --id`` on a GRPO group of three completions of one prompt: the group
    view's advantages, gamma of the selected row, the bands' consistency with FAI, and a page that is whole when
    copied alone (pictures inlined), shows newlines and prints the values."""
    answer = "In April 48.\n\nIn May 48 / 2 = 24.\nSo 48 + 24 = 72 clips altogether."
    rows = [{"id": f"c{i}", "prompt": CORPUS[1], "response": answer[: 30 + 12 * i], "reward": reward}
            for i, reward in enumerate([1.0, 0.0, 1.0])]
    rows.append({"id": "other", "prompt": "unrelated", "response": "text", "reward": 0.3})
    src = tmp_path / "rollouts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "reports"
    assert cli.main(["analyze", "--model", str(tiny_model_dir), "--input", str(src), "--id", "c1", "--out", str(out),
                     "--window", "4", "--horizon", "2", "12", "--no-color"]) == 0
    capsys.readouterr()
    data = json.loads((out / "rhythm.json").read_text())
    assert [m["id"] for m in data["group"]] == ["c0", "c1", "c2"]
    assert [m["advantage"] for m in data["group"]] == pytest.approx(grpo_advantages([1.0, 0.0, 1.0]))
    selected = data["group"][1]
    r0, n = data["response_start"], len(data["tokens"])
    assert selected["selected"] and len(selected["gamma"]) == n - r0
    assert selected["gamma"] == pytest.approx(data["gammas"]["coupled"][r0:])
    assert len(data["local_band"]) == n and len(data["local_band"][0]) == min(64, n)
    assert len(data["fai_band"][0]) == 11                               # lags 2..12
    # the FAI band reproduces the report's per-token FAI (mean over the global heads of the column means);
    # the cells nothing observes (a prompt row, a row past the end) are null, never 0
    for s in range(n):
        rows_in = [s + lag for lag in range(2, 13) if r0 <= s + lag < n]
        cells = data["fai_band"][s]
        assert [lag for lag in range(2, 13) if cells[lag - 2] is not None] == [t - s for t in rows_in]
        assert data["fai_rows"][s] == len(rows_in)                         # |T(s)|, shown beside each FAI
        if rows_in:
            got = sum(c for c in cells if c is not None) / len(rows_in)
            assert got == pytest.approx(data["fai"][s], abs=1e-5)
    assert all(data["local_band"][t][lag] is None for t in range(n) for lag in range(t + 1, len(data["local_band"][0])))

    alone = tmp_path / "copied" / "report.html"
    alone.parent.mkdir()
    shutil.copy(out / "rhythm.html", alone)
    page = alone.read_text(encoding="utf-8")
    images = _images(page)
    assert len(images) == 2                                             # the attention bands and the curves
    for src_attr in images:
        assert src_attr.startswith("data:image/png;base64,")
        assert base64.b64decode(src_attr.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<link" not in page and "<script src" not in page and "http" not in page
    assert "GRPO group: 3 completions" in page and "advantage × γ" in page
    assert '<span class="nl">\u21b5</span>' in page                      # newlines are visible
    waad = data["waad"][r0]
    assert f'<span class="v">{waad:.1f}</span>' in page                # values printed, not only in titles
    assert "H_loc" in page and "layer " in page                         # per-head distance table
    assert "preplan token" in page and "anchor token" in page


@pytest.mark.parametrize("argv, message", [
    (["--id", "x"], "--id needs --input"),
    (["--input", "missing.jsonl"], "does not exist"),
    (["--input", "{rows}", "--id", "nope"], "is not in"),
    (["--input", "{rows}"], "choose one with --id"),
    (["--input", "{rows}", "--id", "a", "--prompt", "hi"], "exclude each other"),
])
def test_analyze_input_errors_before_loading(tiny_model_dir, tmp_path, capsys, argv, message):  # noqa: F811
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a", "prompt": "p", "response": "r"}\n{"id": "b", "prompt": "p", "response": "s"}\n')
    argv = [a.replace("{rows}", str(rows)) for a in argv]
    assert cli.main(["analyze", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "loading" not in err


def test_scores_render_in_notebooks(tiny_model_dir):  # noqa: F811
    from rhythm import RhythmScorer
    from rhythm.models import load_model

    model, tok = load_model(tiny_model_dir)
    ids = torch.tensor([tok(CORPUS[0]).input_ids[:30]])
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 10:] = True
    scores = RhythmScorer(model, window=4, horizon=(2, 8)).score(ids, None, response)
    page = scores._repr_html_()
    assert "<table" in page and "sequence 0" in page and "anchors" in page
    sel = scores.selection()
    top = int(torch.where(sel.anchor[0], scores.fai[0], -1.0).argmax())
    assert f"{scores.fai[0, top].item():.4f}" in page


def test_the_notebook_view_is_registered_by_the_report_layer(monkeypatch):
    """The scorer never imports the report: rhythm.report.html registers the view, and importing any part of
    the package (here the scorer alone, in a fresh interpreter) imports the package, which imports the report."""
    import subprocess
    import sys

    import rhythm.scoring.scorer as scorer_module
    from rhythm.report.html import scores_html

    code = "import rhythm.scoring.scorer as s; print(s._notebook_view.__module__, s._notebook_view.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["rhythm.report.html", "scores_html"]
    assert scorer_module._notebook_view is scores_html
    scores = object.__new__(scorer_module.RhythmScores)
    monkeypatch.setattr(scorer_module, "_notebook_view", None)
    assert scores._repr_html_() is None                     # no view registered: the notebook's plain repr
    scorer_module.set_notebook_view(lambda s: f"<div>{type(s).__name__}</div>")
    assert scores._repr_html_() == "<div>RhythmScores</div>"


@pytest.mark.parametrize("kind", ["gemma2", "llama4", "gpt_oss"])   # window + softcap, chunks, sinks
def test_band_of_real_layers_matches_eager_maps(kind):
    """QKCapture keeps q, k and each sampled layer's description; the band from them is the model's own eager
    attention map on those diagonals."""
    from rhythm.report.band import QKCapture, band_attention
    from rhythm.capture.recording import CaptureRequest

    from .test_capture_models import LENGTH, SAMPLED, VOCAB, eager_run, tiny_model

    model = tiny_model(kind)
    ids = torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    inputs = dict(input_ids=ids, position_ids=torch.arange(LENGTH)[None])
    with torch.no_grad(), QKCapture(model) as capture:
        records = capture.run(CaptureRequest(layers=SAMPLED, window=6, horizon=(2, 12), backend="torch"),
                              **inputs).records
    maps = eager_run(model, inputs)
    lags = range(0, 20)
    for layer in SAMPLED:
        query, key, scale = capture.qk[layer]
        group = query.shape[1] // key.shape[1]
        band = band_attention(query[0], key[0].repeat_interleave(group, 0), records[layer].lse[0], lags=lags,
                              scale=scale, layer=capture.layer_attention[layer])
        attn = maps[layer][0][0].double()                                # [H, T, T]
        for j, lag in enumerate(lags):
            t = torch.arange(lag, LENGTH)
            want = attn[:, t, t - lag]
            assert (band[:, lag:, j].double() - want).abs().max() < 1e-5, (kind, layer, lag)


def _strict_json(path):
    """json.loads that refuses NaN / Infinity (strict JSON)."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _analyze_rows(model_dir, tmp_path, capsys, rows, row_id):
    """``rhythm analyze --input --id row_id`` on ``rows``: (the report's strict JSON, its page)."""
    src = tmp_path / "rollouts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "reports"
    assert cli.main(["analyze", "--model", str(model_dir), "--input", str(src), "--id", row_id, "--out", str(out),
                     "--no-color"]) == 0
    capsys.readouterr()
    return _strict_json(out / "rhythm.json"), (out / "rhythm.html").read_text(encoding="utf-8")


def test_analyze_rollout_with_an_empty_response(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """--id of a rollout whose response is empty: a report without head groups or bands (a TypeError in the
    band code before)."""
    rows = [{"id": "e", "prompt": CORPUS[1], "response": "", "reward": 0.0},
            {"id": "f", "prompt": CORPUS[1], "response": CORPUS[2][:40], "reward": 1.0}]
    data, page = _analyze_rows(tiny_model_dir, tmp_path, capsys, rows, "e")
    assert data["response_start"] == len(data["tokens"]) and data["local_band"] is None and data["fai_band"] is None
    assert data["local_heads"] == [] and not any(data["anchor"])
    assert "the response is empty" in page


def test_report_json_is_strict_without_rewards(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """A group with advantages but no rewards: the reward is null in the JSON (it was NaN, which is not JSON)."""
    rows = [{"id": f"a{i}", "prompt": CORPUS[1], "response": CORPUS[2][: 20 + 10 * i], "advantage": adv}
            for i, adv in enumerate([0.5, -0.5])]
    data, page = _analyze_rows(tiny_model_dir, tmp_path, capsys, rows, "a1")
    assert [m["reward"] for m in data["group"]] == [None, None]
    assert [m["advantage"] for m in data["group"]] == [0.5, -0.5]
    assert "reward –" in page


def test_terminal_output_escapes_control_characters(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """Rollout text carrying ESC / CSI / OSC sequences reaches stdout and stderr only escaped (\\x1b), with and
    without colours."""
    evil = "\x1b[41mred\x1b[0m \x1b]0;owned\x07 \x9b31m" * 3
    rows = [{"id": "x\x1b[2J", "prompt": CORPUS[1], "response": evil + CORPUS[2][:30]}]
    src = tmp_path / "rollouts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for colour in ([], ["--no-color"]):
        assert cli.main(["analyze", "--model", str(tiny_model_dir), "--input", str(src), "--id", "x\x1b[2J",
                         "--out", str(tmp_path / "out"), *colour]) == 0
        captured = capsys.readouterr()
        for stream in (captured.out, captured.err):
            assert "\x1b]" not in stream and "\x07" not in stream and "\x9b" not in stream
            assert "\x1b[41m" not in stream and "\x1b[2J" not in stream
        assert captured.out.count("\\x1b") >= 9             # the text is still there, visibly escaped
    assert cli.main(["analyze", "--model", str(tiny_model_dir), "--input", str(src), "--id", "\x1b[31mnope",
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "nope" in err


# ---- the page and the terminal view, on a hand-built report ------------------------------------------------

def _report(n_prompt=3, n_resp=8, **extra):
    from rhythm.report.sequence import SequenceReport

    n = n_prompt + n_resp
    fai = [5.0] + [0.01] * (n_prompt - 1) + [0.01 * (i + 1) for i in range(n_resp)]   # a sink at position 0
    fields = dict(tokens=[f"t{i}" for i in range(n)], response_start=n_prompt, waad=[1.0] * n, fai=fai,
                  fai_valid=[True] * (n - 2) + [False] * 2, preplan=[False] * n, anchor=[False] * n,
                  dominated=[False] * n, intro=[False] * n, delta=[None] * n, intro_of=[-1] * n,
                  gammas={"coupled": [1.0] * n}, fai_rows=list(range(n, 0, -1)))
    fields.update(extra)
    return SequenceReport(**fields)


def test_global_fai_scale_is_set_by_the_response():
    """The global colour scale tops at the response's largest valid FAI, not at the sink at position 0."""
    from rhythm.report.html import render_html

    page = render_html(_report(), embed_pictures=False)
    assert "FAI 0 to 0.060, the response&#x27;s largest" in page or "FAI 0 to 0.060, the response's largest" in page
    # the response's largest valid FAI (0.06 at response #5) is drawn at the full global colour
    assert "--g:rgba(224,123,0,0.850)" in page


def test_page_shows_rows_behind_fai():
    from rhythm.report.html import render_html

    anchor = [False] * 11
    anchor[5] = True
    page = render_html(_report(anchor=anchor), embed_pictures=False)
    assert "FAI 0.0300 over |T(s)| = 6 rows" in page                # hover of position 5 (fai_rows = 11 - 5)
    assert "<th title='response rows behind the FAI value'>|T(s)|</th>" in page
    assert "<td class=n>6</td>" in page                              # the anchor table's |T(s)| cell


def test_terminal_view_marks_a_token_that_is_both():
    from rhythm.report.terminal import escape_controls, terminal_view

    marks = [False] * 11
    marks[4] = True
    view = terminal_view(_report(preplan=list(marks), anchor=list(marks)), colour=False)
    assert "[{t4}]" in view and "{t4}" in view and "over 7 rows" in view
    assert escape_controls("a\x1b[31mb\x9b\x00\r\n\tc") == "a\\x1b[31mb\\x9b\\x00\\x0d\n\tc"


def test_notebook_views_are_scoped():
    """_repr_html_ returns one element: its CSS applies only under its own id, its ids are its own (two
    reports on one page share none), and no rule touches the host page's body."""
    first, second = _report()._repr_html_(), _report()._repr_html_()
    for page in (first, second):
        assert not page.lstrip().startswith("<!DOCTYPE") and "<body" not in page and "<html" not in page
        root = re.match(r'<div id="([^"]+)"', page).group(1)
        css = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
        for rule in filter(None, (r.strip() for r in css.split("}"))):
            for selector in rule.split("{")[0].split(","):
                assert selector.strip().startswith("#" + root), selector
        assert "document.body" not in page
    ids = lambda page: set(re.findall(r'id="([^"]+)"', page))  # noqa: E731
    assert ids(first) and not ids(first) & ids(second)


def test_min_fai_rows_is_opt_in(tiny_model_dir):  # noqa: F811
    """selection(min_fai_rows=m) keeps only anchors with at least m response rows behind their FAI; the
    default is the paper's definition (any valid FAI)."""
    from rhythm import RhythmScorer
    from rhythm.models import load_model

    model, tok = load_model(tiny_model_dir)
    ids = torch.tensor([tok(CORPUS[0]).input_ids[:40]])
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 8:] = True
    scores = RhythmScorer(model, window=4, horizon=(2, 8), q=1.0).score(ids, None, response)
    rows = scores.fai_rows()
    # |T(s)| written out: rows t in [max(s + 2, 8), min(39, s + 8)]
    assert rows[0].tolist() == [max(0, min(39, s + 8) - max(s + 2, 8) + 1) for s in range(40)]
    plain = scores.selection()
    assert torch.equal(plain.anchor, scores.selection(min_fai_rows=1).anchor)
    strict = scores.selection(min_fai_rows=5)
    assert strict.anchor.any() and bool((rows[strict.anchor] >= 5).all())
    assert bool((plain.anchor & (rows < 5)).any())                        # q = 1 took the thin ones before
    with pytest.raises(ValueError, match="min_fai_rows must be None or an int >= 1"):
        scores.selection(min_fai_rows=0)
