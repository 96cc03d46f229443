"""Reports of one scored sequence: a self-contained HTML page and a PNG plot.

The HTML (no external JS/CSS) shows the response twice, tokens coloured by WAAD (blue) and by FAI
(orange), preplan tokens in [brackets] and anchors boxed, hover tooltips with every value, a strip of
gamma per strategy and the strongest anchors. The PNG (matplotlib, Agg backend) plots WAAD and FAI over
the response with the selected tokens marked.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class SequenceReport:
    """Everything the report shows, for one sequence (lists over the sequence's real positions).

    tokens: token strings. response_start: index of the first response token. waad, fai: per-token
    signals. fai_valid, preplan, anchor, dominated, intro: bools. gammas: strategy -> per-token gamma.
    entropy: per-token entropy or None. meta: free-form header facts (model, layers, timings ...).
    """

    tokens: list[str]
    response_start: int
    waad: list[float]
    fai: list[float]
    fai_valid: list[bool]
    preplan: list[bool]
    anchor: list[bool]
    dominated: list[bool] = field(default_factory=list)
    intro: list[bool] = field(default_factory=list)
    gammas: dict[str, list[float]] = field(default_factory=dict)
    entropy: list[float] | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_scores(cls, scores, tokens: list[str], index: int = 0, meta: dict | None = None,
                    strategies=("coupled", "local", "global", "random", "entropy")) -> "SequenceReport":
        """Build from ``RhythmScores`` (sequence ``index`` of the batch; padded layout)."""
        row, start, end, resp = scores.segments[index]
        sel = scores.selection()

        def take(x):  # selection masks are [n_seq, L] when packed, the input layout [B, T] otherwise
            return x[index, : end - start].tolist() if scores.packed else x[row, start:end].tolist()

        gammas = {}
        for strategy in strategies:
            if strategy == "entropy" and scores.entropy is None:
                continue
            gammas[strategy] = scores.gamma(strategy)[row, start:end].tolist()
        return cls(
            tokens=list(tokens), response_start=resp - start,
            waad=scores.waad[row, start:end].tolist(), fai=scores.fai[row, start:end].tolist(),
            fai_valid=scores.fai_valid[row, start:end].tolist(),
            preplan=take(sel.preplan), anchor=take(sel.anchor), dominated=take(sel.dominated),
            intro=take(sel.intro), gammas=gammas,
            entropy=None if scores.entropy is None else scores.entropy[row, start:end].tolist(),
            meta=dict(meta or {}, layers=scores.layers))

    def response(self, name: str):
        return getattr(self, name)[self.response_start:]

    def strongest_anchors(self, n: int = 10) -> list[tuple[int, str, float]]:
        """(response index, token, FAI) of the top-n anchors by FAI."""
        items = [(i, self.tokens[self.response_start + i], f)
                 for i, (f, a) in enumerate(zip(self.response("fai"), self.response("anchor"))) if a]
        return sorted(items, key=lambda x: (-x[2], x[0]))[:n]


def write_report(report: SequenceReport, out_dir: str | Path, stem: str = "rhythm") -> dict[str, Path]:
    """Write ``<stem>.html``, ``<stem>.png`` and ``<stem>.json`` under out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"html": out_dir / f"{stem}.html", "png": out_dir / f"{stem}.png", "json": out_dir / f"{stem}.json"}
    paths["png"].write_bytes(b"")  # placeholder so the HTML can name it even if plotting fails later
    plot_png(report, paths["png"])
    paths["html"].write_text(render_html(report, png_name=paths["png"].name), encoding="utf-8")
    paths["json"].write_text(json.dumps(report.__dict__, default=float), encoding="utf-8")
    return paths


# ---- PNG ---------------------------------------------------------------------------------------------------------

def plot_png(report: SequenceReport, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    waad, fai = report.response("waad"), report.response("fai")
    valid = report.response("fai_valid")
    preplan, anchor = report.response("preplan"), report.response("anchor")
    x = list(range(len(waad)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    ax1.plot(x, waad, color="#1f5fbf", lw=1.2, label="WAAD (local heads)")
    px = [i for i in x if preplan[i]]
    ax1.scatter(px, [waad[i] for i in px], color="#d62728", s=18, zorder=3, label="preplan (top-q |ΔWAAD|)")
    ax1.set_ylabel("WAAD")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(x, [f if v else float("nan") for f, v in zip(fai, valid)], color="#e07b00", lw=1.2,
             label="FAI (global heads)")
    ax_ = [i for i in x if anchor[i]]
    ax2.scatter(ax_, [fai[i] for i in ax_], color="#2ca02c", s=22, marker="^", zorder=3, label="anchor (top-q FAI)")
    for i, _, f in report.strongest_anchors(5):
        ax2.annotate(repr(report.tokens[report.response_start + i])[1:-1][:12], (i, f), fontsize=7,
                     xytext=(2, 4), textcoords="offset points")
    ax2.set_ylabel("FAI")
    ax2.set_xlabel("response token index")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.grid(alpha=0.3)
    title = report.meta.get("title", "Preplan-and-anchor rhythm")
    fig.suptitle(f"{title} — layers {report.meta.get('layers', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- HTML --------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1300px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.tok{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;padding:1px 0;
border-radius:2px;cursor:default}
.seq{line-height:1.9;border:1px solid #ddd;padding:10px;border-radius:6px;background:#fff}
.prompt{color:#888}
.pre::before{content:"[";color:#c00;font-weight:bold}.pre::after{content:"]";color:#c00;font-weight:bold}
.anc{outline:2px solid #1a7f1a;font-weight:bold}.dom{outline:2px dashed #1a7f1a}
.intro{text-decoration:underline wavy #a0f}
.legend span{margin-right:18px}.meta td{padding:2px 10px 2px 0;font-size:13px}
.strip{display:flex;height:14px;margin:2px 0 8px 0}.strip div{flex:1}
table.anchors td,table.anchors th{padding:2px 10px;font-size:13px;text-align:left}
"""


def _blue(v: float) -> str:
    return f"rgba(31,95,191,{0.08 + 0.8 * max(0.0, min(1.0, v)):.3f})"


def _orange(v: float) -> str:
    return f"rgba(224,123,0,{0.05 + 0.85 * max(0.0, min(1.0, v)):.3f})"


def _tooltip(r: SequenceReport, t: int) -> str:
    parts = [f"pos {t} (response #{t - r.response_start})" if t >= r.response_start else f"pos {t} (prompt)",
             f"WAAD {r.waad[t]:.3f}", f"FAI {r.fai[t]:.4f}" + ("" if r.fai_valid[t] else " (invalid)")]
    if r.entropy is not None:
        parts.append(f"entropy {r.entropy[t]:.3f}")
    for name, g in r.gammas.items():
        parts.append(f"γ {name} {g[t]:.2f}")
    flags = [n for n, m in (("preplan", r.preplan), ("anchor", r.anchor), ("dominated", r.dominated),
                            ("intro", r.intro)) if m and m[t]]
    if flags:
        parts.append("· " + ", ".join(flags))
    return "\n".join(parts)


def _tokens_html(r: SequenceReport, colour: str) -> str:
    # colours span the response's own range (min -> faint, max -> dark)
    waad_lo, waad_hi = min(r.response("waad") or [0.0]), max(r.response("waad") or [1.0])
    fai_vals = [f for f, v in zip(r.response("fai"), r.response("fai_valid")) if v] or [0.0]
    fai_lo, fai_hi = min(fai_vals), max(fai_vals)
    scale = lambda v, lo, hi: (v - lo) / (hi - lo) if hi > lo else 0.5  # noqa: E731
    out = []
    for t, tok in enumerate(r.tokens):
        text = html.escape(tok)
        tip = html.escape(_tooltip(r, t), quote=True)
        if t < r.response_start:
            out.append(f'<span class="tok prompt" title="{tip}">{text}</span>')
            continue
        cls = ["tok"]
        if r.preplan[t]:
            cls.append("pre")
        if r.anchor[t]:
            cls.append("dom" if r.dominated and r.dominated[t] else "anc")
        if r.intro and r.intro[t]:
            cls.append("intro")
        bg = _blue(scale(r.waad[t], waad_lo, waad_hi)) if colour == "waad" else (
            _orange(scale(r.fai[t], fai_lo, fai_hi)) if r.fai_valid[t] else "transparent")
        out.append(f'<span class="{" ".join(cls)}" style="background:{bg}" title="{tip}">{text}</span>')
    return "".join(out)


def _gamma_strips(r: SequenceReport) -> str:
    rows = []
    for name, g in r.gammas.items():
        resp = g[r.response_start:]
        top = max(resp + [1.0])
        cells = "".join(
            f'<div title="#{i} {html.escape(r.tokens[r.response_start + i])!s} γ={v:.2f}" '
            f'style="background:rgba(120,40,200,{0.0 if top <= 1 else (v - 1) / (top - 1):.2f})"></div>'
            for i, v in enumerate(resp))
        boosted = sum(v > 1 for v in resp)
        rows.append(f"<div><b>{html.escape(name)}</b> — {boosted}/{len(resp)} tokens amplified, "
                    f"max γ {top:.2f}</div><div class='strip'>{cells}</div>")
    return "".join(rows)


def render_html(r: SequenceReport, png_name: str | None = None) -> str:
    meta_rows = "".join(f"<tr><td><b>{html.escape(str(k))}</b></td><td>{html.escape(str(v))}</td></tr>"
                        for k, v in r.meta.items() if k != "title")
    anchors = "".join(f"<tr><td>{i}</td><td><code>{html.escape(tok)}</code></td><td>{f:.4f}</td></tr>"
                      for i, tok, f in r.strongest_anchors(12))
    n_resp = len(r.tokens) - r.response_start
    summary = (f"{n_resp} response tokens · {sum(r.response('preplan'))} preplan · "
               f"{sum(r.response('anchor'))} anchors ({sum(r.response('dominated') or [0])} locally dominated)")
    png = f'<h2>Curves</h2><img src="{html.escape(png_name)}" style="max-width:100%">' if png_name else ""
    title = html.escape(r.meta.get("title", "Preplan-and-anchor rhythm"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style></head>
<body>
<h1>{title}</h1>
<table class="meta">{meta_rows}</table>
<p>{summary}</p>
<p class="legend"><span><span class="tok pre">tok</span> preplan (T_loc)</span>
<span><span class="tok anc">tok</span> anchor (T_glob)</span><span><span class="tok dom">tok</span> dominated anchor</span>
<span><span class="tok intro">tok</span> intro of a dominated anchor</span> Hover a token for its values.</p>
<h2>Coloured by WAAD (local heads: darker = looks further back, within W; scaled to the response's range)</h2>
<div class="seq">{_tokens_html(r, "waad")}</div>
<h2>Coloured by FAI (global heads: darker = more attention from later tokens; scaled to the response's range)</h2>
<div class="seq">{_tokens_html(r, "fai")}</div>
<h2>γ per strategy (response tokens, left to right)</h2>
{_gamma_strips(r)}
<h2>Strongest anchors</h2>
<table class="anchors"><tr><th>response #</th><th>token</th><th>FAI</th></tr>{anchors}</table>
{png}
</body></html>
"""
