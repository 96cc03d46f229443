"""The report as one self-contained HTML page (pictures inlined as base64 PNG; a few lines of inline script
only toggle the display; without script the page shows values on the per-response colour scale).

Sections: the response coloured by WAAD and by FAI (value of each token printed above it, newlines shown as
a visible return glyph), the top preplan tokens and anchors with their values, the head groups (every head's
mean distance, local and global marked) and their attention bands, gamma per strategy, the curves, and the
GRPO group of completions of the same prompt (reward, advantage and advantage x gamma per token).
"""
from __future__ import annotations

import base64
import html
import uuid

from rhythm.scoring.scorer import set_notebook_view

NEWLINE = "\u21b5"  # the visible return glyph drawn for "\n"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}h3{font-size:14px;margin:14px 0 4px 0}
.controls{position:sticky;top:0;background:#f6f6f6;border:1px solid #ddd;border-radius:6px;padding:6px 10px;
font-size:13px;z-index:2}.controls label{margin-right:18px}
.seq{display:flex;flex-wrap:wrap;align-items:flex-end;row-gap:3px;border:1px solid #ddd;padding:10px;
border-radius:6px;background:#fff;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
.seq .br{flex-basis:100%;height:0}
.tok{white-space:pre;border-radius:2px;cursor:default;background:var(--r,transparent);display:flex;
flex-direction:column;align-items:center;margin:1px 2px 1px 0}
body.global .tok{background:var(--g,transparent)}
.tok .v{font-size:8px;line-height:10px;color:#444;font-family:system-ui,sans-serif;padding:0 1px}
body.novalues .tok{margin:1px 0}body.novalues .tok .v{display:none}
.legend .tok{display:inline}
.prompt{color:#999}.nl{color:#b58900;font-weight:bold}
.pre{box-shadow:inset 0 -3px 0 #d62728}
.anc{outline:2px solid #1a7f1a;font-weight:bold}.dom{outline:2px dashed #1a7f1a}
.intro>span:last-child{text-decoration:underline wavy #a0f}
.legend span{margin-right:16px}.meta td{padding:2px 10px 2px 0;font-size:13px;vertical-align:top}
.strip{display:flex;height:14px;margin:2px 0 8px 0}.strip div{flex:1}
table.t{border-collapse:collapse;margin-right:24px}table.t td,table.t th{padding:2px 8px;font-size:13px;
text-align:left;border-bottom:1px solid #eee}table.t td.n{text-align:right;font-variant-numeric:tabular-nums}
.pair{display:flex;flex-wrap:wrap;align-items:flex-start}
table.heads td{width:44px;text-align:center;font-size:12px;font-variant-numeric:tabular-nums;border:1px solid #fff}
td.loc{background:#c6dbef}td.glob{background:#fdd0a2}
.member{border:1px solid #ddd;border-radius:6px;padding:6px 10px;margin:8px 0}
.member.selected{border:2px solid #555}.member .head{font-size:13px;margin-bottom:2px}
img{max-width:100%}
"""

# The toggles act on the report's own root element (its id: UID), never on the host page.
_SCRIPT = """
(function(){var root=document.getElementById('UID');if(!root)return;
function toggle(){root.classList.toggle('novalues',!document.getElementById('UID-values').checked);
root.classList.toggle('global',document.getElementById('UID-global').checked);}
root.querySelectorAll('.controls input').forEach(function(i){i.addEventListener('change',toggle);});})();
"""


def scoped_css(scope: str, css: str = _CSS) -> str:
    """``css`` restricted to the element matching ``scope`` (e.g. ``#rhythm-report-1a2b``): a ``body`` rule
    styles that element itself, every other selector only its descendants, so the report never restyles the
    page it is embedded in (a notebook)."""
    rules = []
    for rule in css.strip().split("}"):
        if "{" not in rule:
            continue
        selectors, body = rule.split("{", 1)
        scoped = [scope + sel[len("body"):] if sel.startswith("body") else f"{scope} {sel}"
                  for sel in (part.strip() for part in selectors.split(","))]
        rules.append(",".join(scoped) + "{" + body.strip() + "}")
    return "\n".join(rules)


def new_uid(prefix: str = "rhythm-report") -> str:
    """A fresh element id, so that two reports on one page (a notebook) never share ids."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _rgba(rgb: tuple[int, int, int], v: float, lo: float = 0.06, hi: float = 0.85) -> str:
    v = max(0.0, min(1.0, v))
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{lo + (hi - lo) * v:.3f})"


BLUE, ORANGE, GREEN, RED, PURPLE = (31, 95, 191), (224, 123, 0), (26, 140, 26), (205, 35, 35), (120, 40, 200)


def _unit(v: float, lo: float, hi: float) -> float:
    return (v - lo) / (hi - lo) if hi > lo else 0.5


def _visible(token: str) -> tuple[str, int]:
    """Escaped token text with newlines drawn as the return glyph and tabs as an arrow; the number of line
    breaks to emit after it."""
    text = html.escape(token).replace("\t", "\u2192")
    breaks = token.count("\n")
    if breaks:
        text = text.replace("\n", f'<span class="nl">{NEWLINE}</span>')
    elif token == "":
        text = "\u2205"
    return text, breaks


def _token(token: str, classes: list[str], tip: str, value: str | None = None, colours: tuple[str, str] | None = None):
    text, breaks = _visible(token)
    style = f' style="--r:{colours[0]};--g:{colours[1]}"' if colours else ""
    shown = f'<span class="v">{html.escape(value)}</span>' if value is not None else ""
    return (f'<span class="{" ".join(["tok"] + classes)}"{style} title="{html.escape(tip, quote=True)}">{shown}'
            f"<span>{text}</span></span>" + '<span class="br"></span>' * breaks)


def _rows_behind(r, t: int) -> str:
    """|T(t)|, the response rows behind the FAI value at t, as shown in the hover and the tables."""
    return f"{r.fai_rows[t]} row{'s' if r.fai_rows[t] != 1 else ''}" if r.fai_rows else "?"


def _tooltip(r, t: int) -> str:
    parts = [f"pos {t} (response #{t - r.response_start})" if t >= r.response_start else f"pos {t} (prompt)",
             f"WAAD {r.waad[t]:.3f}",
             f"FAI {r.fai[t]:.4f} over |T(s)| = {_rows_behind(r, t)}" if r.fai_valid[t] else
             f"FAI {r.fai[t]:.4f} (invalid: no response row in the horizon)"]
    if r.delta and r.delta[t] is not None:
        parts.append(f"ΔWAAD {r.delta[t]:.3f}")
    if r.entropy is not None:
        parts.append(f"entropy {r.entropy[t]:.3f}")
    for name, g in r.gammas.items():
        parts.append(f"γ {name} {g[t]:.2f}")
    flags = [n for n, m in (("preplan", r.preplan), ("anchor", r.anchor), ("dominated", r.dominated),
                            ("intro", r.intro)) if m and m[t]]
    if flags:
        parts.append("· " + ", ".join(flags))
    return "\n".join(parts)


def _fai_global_max(r) -> float:
    """Top of the global FAI colour scale: the largest valid FAI of the *response* (prompt tokens, the
    attention sink at position 0 above all, can be tens of times larger and would leave the response blank)."""
    values = [f for f, v in zip(r.response("fai"), r.response("fai_valid")) if v]
    return max(values, default=0.0)


def _tokens_html(r, signal: str, fai_scale_max: float) -> str:
    """The sequence, response tokens coloured by ``signal`` ("waad" | "fai") on the per-response range (--r)
    and on the global range (--g: WAAD over [0, W], FAI over [0, the report's largest FAI])."""
    resp_waad = r.response("waad") or [0.0]
    valid_fai = [f for f, v in zip(r.response("fai"), r.response("fai_valid")) if v] or [0.0]
    out = []
    for t, token in enumerate(r.tokens):
        tip = _tooltip(r, t)
        if t < r.response_start:
            out.append(_token(token, ["prompt"], tip))
            continue
        classes = []
        if r.preplan[t]:
            classes.append("pre")
        if r.anchor[t]:
            classes.append("dom" if r.dominated and r.dominated[t] else "anc")
        if r.intro and r.intro[t]:
            classes.append("intro")
        if signal == "waad":
            v = r.waad[t]
            colours = (_rgba(BLUE, _unit(v, min(resp_waad), max(resp_waad))), _rgba(BLUE, v / r.window))
            value = f"{v:.1f}"
        elif r.fai_valid[t]:
            v = r.fai[t]
            colours = (_rgba(ORANGE, _unit(v, min(valid_fai), max(valid_fai))),
                       _rgba(ORANGE, v / fai_scale_max if fai_scale_max > 0 else 0.0))
            value = f"{v:.3f}".lstrip("0") or "0"
        else:
            colours, value = ("transparent", "transparent"), "–"
        out.append(_token(token, classes, tip, value, colours))
    return "".join(out)


def _top_tables(r) -> str:
    def tok(t: int) -> str:
        return f"<code>{_visible(r.tokens[t])[0]}</code>"

    rows = []
    for rank, (i, _, d) in enumerate(r.strongest_preplan(12), 1):
        t = r.response_start + i
        rows.append(f"<tr><td class=n>{rank}</td><td class=n>{i}</td><td>{tok(t)}</td><td class=n>{d:.3f}</td>"
                    f"<td class=n>{r.waad[t]:.2f}</td><td class=n>{r.waad[t + 1]:.2f}</td></tr>")
    preplan = ("<table class=t><tr><th>rank</th><th>resp #</th><th>preplan token</th><th>ΔWAAD</th><th>WAAD_t</th>"
               "<th>WAAD_t+1</th></tr>" + "".join(rows) + "</table>")
    rows = []
    for rank, (i, _, f) in enumerate(r.strongest_anchors(12), 1):
        t = r.response_start + i
        dominated = bool(r.dominated and r.dominated[t])
        intro = r.intro_of[t] if r.intro_of else -1
        intro_cell = f"#{intro - r.response_start} {tok(intro)}" if dominated and intro >= 0 else ""
        behind = r.fai_rows[t] if r.fai_rows else "?"
        rows.append(f"<tr><td class=n>{rank}</td><td class=n>{i}</td><td>{tok(t)}</td><td class=n>{f:.4f}</td>"
                    f"<td class=n>{behind}</td><td class=n>{r.waad[t]:.2f}</td><td>{'yes' if dominated else ''}</td>"
                    f"<td>{intro_cell}</td></tr>")
    anchors = ("<table class=t><tr><th>rank</th><th>resp #</th><th>anchor token</th><th>FAI</th>"
               "<th title='response rows behind the FAI value'>|T(s)|</th><th>WAAD</th>"
               "<th>dominated</th><th>intro token</th></tr>" + "".join(rows) + "</table>")
    return f"<div class=pair>{preplan}{anchors}</div>"


def _heads_table(r) -> str:
    if not r.head_distance:
        return ""
    local, global_ = set(map(tuple, r.local_heads)), set(map(tuple, r.global_heads))
    header = "".join(f"<th>h{h}</th>" for h in range(r.heads_per_layer))
    rows = []
    for slot, layer in enumerate(r.layers):
        cells = []
        for h, d in enumerate(r.head_distance[slot]):
            cls = "loc" if (layer, h) in local else "glob" if (layer, h) in global_ else ""
            cells.append(f'<td class="{cls}">{d:.1f}</td>')
        rows.append(f"<tr><th>layer {layer}</th>{''.join(cells)}</tr>")
    return (f"<p>Mean attention distance d(l, h) over the response rows, every head of the sampled layers; "
            f'<span style="background:#c6dbef">local group H_loc</span> ({len(local)} smallest d), '
            f'<span style="background:#fdd0a2">global group H_glob</span> ({len(global_)} largest d).</p>'
            f"<table class='heads t'><tr><th></th>{header}</tr>{''.join(rows)}</table>")


def _gamma_strips(r) -> str:
    rows = []
    for name, g in r.gammas.items():
        resp = g[r.response_start:]
        top = max(resp + [1.0])
        cells = "".join(
            f'<div title="#{i} {html.escape(r.tokens[r.response_start + i])} γ={v:.2f}" '
            f'style="background:{_rgba(PURPLE, 0 if top <= 1 else (v - 1) / (top - 1), 0.0, 0.9)}"></div>'
            for i, v in enumerate(resp))
        boosted = sorted({round(v, 4) for v in resp if v > 1})
        levels = ", ".join(f"{sum(abs(v - b) < 1e-6 for v in resp)} at {b:.2f}" for b in boosted)
        rows.append(f"<div><b>{html.escape(name)}</b>: {sum(v > 1 for v in resp)}/{len(resp)} tokens amplified "
                    f"({levels or 'none'})</div><div class='strip'>{cells}</div>")
    return "".join(rows)


def _group_html(r) -> str:
    if not r.group:
        return ""
    peak = max((abs(v) for m in r.group for v in m.shaped), default=0.0) or 1.0
    blocks = []
    for m in r.group:
        tokens = []
        for i, (token, g, v) in enumerate(zip(m.tokens, m.gamma, m.shaped)):
            colour = _rgba(GREEN if v >= 0 else RED, abs(v) / peak, 0.0, 0.85)
            tip = f"response #{i}\nγ {g:.2f}\nadvantage × γ {v:+.3f}"
            tokens.append(_token(token, [], tip, f"{v:+.2f}", (colour, colour)))
        blocks.append(f"<div class='member{' selected' if m.selected else ''}'><div class=head><b>{html.escape(m.id)}"
                      f"</b>{' (this report)' if m.selected else ''} — reward {'–' if m.reward is None else f'{m.reward:g}'}, advantage "
                      f"{m.advantage:+.3f}</div><div class=seq>{''.join(tokens)}</div></div>")
    return (f"<h2>GRPO group: {len(r.group)} completions of this prompt</h2><p>advantage × γ per response token "
            f"(γ of strategy <b>{html.escape(r.group_strategy)}</b>; green positive, red negative, one scale for "
            f"the whole group, largest abs value {peak:.3f}).</p>" + "".join(blocks))


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def render_html(r, *, embed_pictures: bool = True, curves: bytes | None = None, fragment: bool = False,
                uid: str = "rhythm-report") -> str:
    """The report as a whole page, or (``fragment``) as one ``<div id=uid>`` for a notebook: its CSS is scoped to
    that element, its ids derive from ``uid`` and its script toggles only that element. embed_pictures: draw
    the PNG pictures (matplotlib) and inline them; curves: the curve PNG when the caller already drew it."""
    bands = None
    if embed_pictures:
        from rhythm.report.plots import bands_png, curves_png

        curves = curves if curves is not None else curves_png(r)
        bands = bands_png(r)
    meta_rows = "".join(f"<tr><td><b>{html.escape(str(k))}</b></td><td>{html.escape(str(v))}</td></tr>"
                        for k, v in r.meta.items() if k != "title")
    n_resp = len(r.tokens) - r.response_start
    summary = (f"{n_resp} response tokens · {sum(r.response('preplan'))} preplan · "
               f"{sum(r.response('anchor'))} anchors ({sum(r.response('dominated') or [0])} locally dominated) · "
               f"W = {r.window}, FAI horizon = {tuple(r.horizon)}, layers {r.layers}")
    if r.min_fai_rows is not None:
        summary += (f" · anchor candidates need |T(s)| >= {r.min_fai_rows} response rows behind their FAI "
                    "(opt-in; γ keeps the paper's definition)")
    if n_resp == 0:
        summary += " · the response is empty: no head groups, no anchors, no bands"
    fai_max = _fai_global_max(r)
    title = html.escape(r.meta.get("title", "Preplan-and-anchor rhythm"))
    bands_html = ""
    if bands:
        bands_html = ("<h2>Head groups' attention near the diagonal</h2><p>Exact probabilities exp(S - lse) from the "
                      "sampled layers' q, k and lse on a band of diagonals only (no T x T map); grey cells: "
                      "nothing observes them (outside the sequence, or a prompt row in the FAI band).</p>"
                      + _img(bands, "attention bands"))
    body = f"""<div id="{uid}" class="rhythm-report">
<style>{scoped_css("#" + uid)}</style>
<h1>{title}</h1>
<table class="meta">{meta_rows}</table>
<p>{summary}</p>
<div class="controls"><label><input type="checkbox" id="{uid}-values" checked> show values</label>
<label><input type="radio" name="{uid}-scale" id="{uid}-response" checked> colours per response (min to max)</label>
<label><input type="radio" name="{uid}-scale" id="{uid}-global"> global colour scale (WAAD 0 to W = {r.window},
FAI 0 to {fai_max:.3f}, the response's largest)</label></div>
<p class="legend"><span><span class="tok pre">tok</span> preplan (T_loc)</span>
<span><span class="tok anc">tok</span> anchor (T_glob)</span><span><span class="tok dom">tok</span> dominated anchor</span>
<span><span class="tok intro"><span>tok</span></span> intro of a dominated anchor</span>
<span><span class="nl">{NEWLINE}</span> newline</span> Hover a token for all its values.</p>
<h2>WAAD per token (local heads: darker = looks further back, within W)</h2>
<div class="seq">{_tokens_html(r, "waad", fai_max)}</div>
<h2>FAI per token (global heads: darker = more attention from later tokens; – = no response row in the horizon)</h2>
<div class="seq">{_tokens_html(r, "fai", fai_max)}</div>
<h2>Top preplan tokens and anchors</h2>
{_top_tables(r)}
<h2>Heads</h2>
{_heads_table(r)}
{bands_html}
<h2>γ per strategy (response tokens, left to right)</h2>
{_gamma_strips(r)}
{"<h2>Curves</h2>" + _img(curves, "WAAD and FAI curves") if curves else ""}
{_group_html(r)}
<script>{_SCRIPT.replace("UID", uid)}</script>
</div>"""
    if fragment:
        return body
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>
<body>
{body}
</body></html>
"""


def scores_html(scores, max_sequences: int = 8) -> str:
    """A notebook view of ``RhythmScores`` (no tokenizer at hand: positions instead of token text): per
    sequence the response length, the head groups, the top anchors and preplan tokens with their values and a
    WAAD / FAI strip over the response."""
    from rhythm.credit.heads import head_to_layer

    rows, sel, behind = scores.signals, scores.selection(), scores.fai_rows()
    blocks = []
    for i, span in enumerate(scores.segments.spans[:max_sequences]):
        row, start, end, resp = span.row, span.start, span.end, span.response_start
        response = slice(span.prompt_length, span.length)   # the response in sequence i's row
        waad, fai, valid = (x[i, response].tolist() for x in (rows.waad, rows.fai, rows.fai_valid))
        anchor, preplan, delta = (x[i, response] for x in (sel.anchor, sel.preplan, sel.delta))
        counts = behind[i, response].tolist()
        anchors = sorted(((fai[j], j) for j in range(len(fai)) if anchor[j]), key=lambda x: (-x[0], x[1]))[:5]
        plans = sorted(((float(delta[j]), j) for j in range(len(fai)) if preplan[j]), key=lambda x: (-x[0], x[1]))[:5]
        heads = scores.heads_per_layer

        def pairs(flat):
            return ", ".join(f"L{head_to_layer(int(x), heads, scores.layers)[0]}h{int(x) % heads}"
                             for x in flat.tolist() if x >= 0) or "none (empty response)"

        w_hi, f_hi = max(waad, default=0.0), max([f for f, v in zip(fai, valid) if v], default=0.0)
        strip = lambda values, rgb, hi, fmt: "".join(  # noqa: E731
            f'<div title="resp #{j}: {fmt.format(v)}" style="background:{_rgba(rgb, v / hi if hi > 0 else 0, 0, 0.9)}">'
            f"</div>" for j, v in enumerate(values))
        blocks.append(
            f"<h3>sequence {i} (row {row}, positions {start}..{end - 1}, response from {resp}: {end - resp} tokens)</h3>"
            f"<table class=t><tr><td>local heads</td><td>{pairs(scores.groups.local[i])}</td></tr>"
            f"<tr><td>global heads</td><td>{pairs(scores.groups.global_[i])}</td></tr>"
            f"<tr><td>top anchors (resp #: FAI over |T(s)| rows)</td>"
            f"<td>{', '.join(f'#{j}: {v:.4f} ({counts[j]})' for v, j in anchors)}</td></tr>"
            f"<tr><td>top preplan (resp #: ΔWAAD)</td><td>{', '.join(f'#{j}: {v:.3f}' for v, j in plans)}</td></tr>"
            f"</table><div>WAAD (0 to {w_hi:.2f})</div><div class=strip>{strip(waad, BLUE, w_hi, '{:.3f}')}</div>"
            f"<div>FAI (0 to {f_hi:.4f})</div><div class=strip>{strip(fai, ORANGE, f_hi, '{:.4f}')}</div>")
    more = scores.segments.count - max_sequences
    tail = f"<p>... and {more} more sequences</p>" if more > 0 else ""
    uid = new_uid("rhythm-scores")
    return (f"<div id=\"{uid}\" class=rhythm-scores><style>{scoped_css('#' + uid)}</style><div>"
            f"<b>RhythmScores</b>: {scores.segments.count} sequences, layers {scores.layers}, "
            f"{scores.heads_per_layer} heads per layer, W = {scores.config.window}, horizon "
            f"{tuple(scores.config.horizon)}{''.join(blocks)}{tail}</div></div>")


set_notebook_view(scores_html)   # RhythmScores._repr_html_ draws with the report (the scorer never imports it)
