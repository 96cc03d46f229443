"""The probe as one self-contained HTML page: the summary table beside the paper's numbers, two plots inlined
as base64 PNG (Jaccard pairs; coupling lift by offset), the head groups, and every trial. Every text that
comes from the user or the model is escaped."""
from __future__ import annotations

import base64
import html

from rhythm.app.probe.text import printable
from rhythm.app.probe.trials import NEAR, OFFSETS

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 8px;font-size:13px;text-align:left;
border-bottom:1px solid #eee;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f4f4f4}.note{font-size:12px;color:#555;max-width:1100px}.paper{color:#7a4b00}
.meta td{border:none;padding:1px 10px 1px 0}.pre{white-space:pre-wrap;font-family:ui-monospace,Menlo,monospace;
font-size:12px;max-width:640px}details{margin:4px 0}summary{cursor:pointer;font-size:13px}
td.loc{background:#c6dbef}td.glob{background:#fdd0a2}img{max-width:100%}
"""


def _e(value) -> str:
    """Escaped for HTML, control characters (but newlines and tabs) shown as escapes."""
    return html.escape(printable(value, keep="\n\t"), quote=True)


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _p(x) -> str:
    if x is None:
        return "–"
    return f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def _ci(pair, digits: int = 3) -> str:
    if not pair:
        return "–"
    if isinstance(pair, dict):
        return f"[{_f(pair['low'], digits)}, {_f(pair['high'], digits)}] ({pair['coverage']:.1%})"
    return f"[{_f(pair[0], digits)}, {_f(pair[1], digits)}]"


def _png(data: bytes | None, alt: str) -> str:
    if not data:
        return ""
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _plots(result: dict) -> tuple[bytes | None, bytes | None]:
    from rhythm.report.plots import _png as png, _pyplot

    plt = _pyplot()
    records = [r for r in result["records"] if r.get("trials")]
    pairs = [(by[("low", r_)], by[("high", r_)], by.get(("random", r_)))
             for by in ({(t["kind"], t["rank"]): t["jaccard"] for t in rec["trials"]} for rec in records)
             for r_ in range(result["settings"]["probe"]["k"]) if ("low", r_) in by and ("high", r_) in by]
    first = None
    if pairs:
        fig, ax = plt.subplots(figsize=(5.2, 5))
        ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
        ax.scatter([a for a, _, _ in pairs], [b for _, b, _ in pairs], s=22, color="#c0392b", alpha=0.7,
                   label="trial: (low-FAI J, high-FAI J)")
        ax.set_xlabel("Jaccard after perturbing a low-FAI token")
        ax.set_ylabel("Jaccard after perturbing a high-FAI token")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("below the diagonal: the high-FAI perturbation deviates more", fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        first = png(fig)
    coupling = result["summary"]["coupling"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, label, colour in (("waad_peaks", "anchors around WAAD peaks", "#1f5fbf"),
                                ("preplan", "anchors around preplan tokens", "#2ca02c")):
        lifts = [coupling[name]["by_offset"][str(d)]["lift"] for d in OFFSETS]
        ax.plot(list(OFFSETS), [float("nan") if v is None else v for v in lifts], marker="o", color=colour,
                label=label)
    ax.axhline(1.0, color="#999", lw=1, ls="--", label="chance (permutation baseline)")
    ax.set_xlabel("offset: anchor position - peak position")
    ax.set_ylabel("lift = observed / expected anchors")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return first, png(fig)


def _paired_row(name: str, s: dict, paper: str, *, what: str) -> str:
    share = "–" if s["share_less"] is None else f"{s['share_less']:.1%} {_ci(s['share_less_ci'])}"
    return (f"<tr><td>{name}</td><td class=n>{s['n']}</td><td class=n>{_f(s['mean_a'])} vs {_f(s['mean_b'])}</td>"
            f"<td class=n>{_f(s['mean_diff'])} {_ci(s['mean_diff_ci'])}</td>"
            f"<td class=n>{_f(s['median_diff'])} {_ci(s['median_diff_ci'])}</td>"
            f"<td class=n>{share} ({what}; ties {s['n_ties']})</td>"
            f"<td class=n>{_p(s['sign_p'])}</td><td class=n>{_p(s['wilcoxon_p'])} ({s['wilcoxon_method']})</td>"
            f"<td class=paper>{paper}</td></tr>")


def _summary_table(summary: dict) -> str:
    pert, paper = summary["perturbation"], summary["paper"]
    head = ("<tr><th>test</th><th>n</th><th>mean a vs b</th><th>mean a − b [95% bootstrap]</th>"
            "<th>median a − b [exact CI]</th><th>share a &lt; b [Clopper–Pearson 95%]</th><th>sign test p</th>"
            f"<th>Wilcoxon p</th><th>paper ({_e(paper['model'])})</th></tr>")
    rows = [
        _paired_row("Jaccard: high-FAI (a) vs low-FAI (b) perturbation, per trial", pert["high_vs_low"],
                    f"{paper['jaccard_high']} vs {paper['jaccard_low']}; high deviates more in "
                    f"{paper['high_deviates_more']:.2%} of trials", what="high deviates more"),
        _paired_row("same, one pair per prompt (mean over its trials)", pert["high_vs_low_by_prompt"], "–",
                    what="high deviates more"),
        _paired_row("Jaccard: high-FAI (a) vs random (b)", pert["high_vs_random"], "–", what="high deviates more"),
        _paired_row("Jaccard: random (a) vs low-FAI (b)", pert["random_vs_low"], "–", what="random deviates more"),
        _paired_row("entropy at WAAD peaks (a) vs other response tokens (b), per response",
                    summary["entropy"]["peaks_vs_others"], "WAAD peaks at high-entropy tokens (qualitative)",
                    what="peaks lower"),
    ]
    heads = summary["heads"]
    if heads.get("responses"):
        rows.append(_paired_row("attention-sink share A[t, 0]: global (a) vs local (b) heads, per response",
                                heads["sink_global_vs_local"], "–", what="global lower"))
    rho = summary["entropy"]["spearman"]
    replay = pert["replay"]
    one = (f"<tr><td>Spearman ρ(WAAD, entropy) per response</td><td class=n>{rho['n']}</td>"
           f"<td class=n>mean {_f(rho['mean'])}</td><td class=n>{_ci(rho['mean_ci'])}</td>"
           f"<td class=n>{_f(rho['median'])}</td><td class=n>{rho['n_positive']} positive, {rho['n_negative']} "
           f"negative</td><td class=n>{_p(rho['sign_p'])}</td><td class=n>{_p(rho['wilcoxon_p'])} "
           f"({rho['wilcoxon_method']})</td><td class=paper>–</td></tr>")
    lifts = []
    for name, label in (("waad_peaks", "WAAD peaks"), ("preplan", "preplan tokens")):
        c = summary["coupling"][name]["near"]
        lifts.append(f"<tr><td>anchors at or just after {label} (offsets {NEAR[0]}..{NEAR[-1]})</td>"
                     f"<td class=n>{c['responses']}</td><td class=n>{c['observed']} observed vs "
                     f"{_f(c['expected'], 1)} expected</td><td class=n>lift {_f(c['lift'], 2)}</td><td></td><td></td>"
                     f"<td></td><td class=n>p {_p(c['p'])} (exact permutation, one-sided)</td>"
                     f"<td class=paper>more often than chance (qualitative)</td></tr>")
    replay_row = (f"<tr><td>replay check: unperturbed continuation reproduces the original</td>"
                  f"<td class=n>{replay['n']}</td><td class=n colspan=7>{replay['identical']} of {replay['n']} "
                  "identical</td></tr>")
    return f"<table>{head}{''.join(rows)}{one}{''.join(lifts)}{replay_row}</table>"


def _lift_table(summary: dict) -> str:
    cells = ["<tr><th>offset</th>" + "".join(f"<th>{d:+d}</th>" for d in OFFSETS) + "</tr>"]
    for name, label in (("waad_peaks", "WAAD peaks"), ("preplan", "preplan tokens")):
        by = summary["coupling"][name]["by_offset"]
        cells.append(f"<tr><td>{label}: lift (p)</td>" + "".join(
            f"<td class=n>{_f(by[str(d)]['lift'], 2)} ({_p(by[str(d)]['p'])})</td>" for d in OFFSETS) + "</tr>")
    return "<table>" + "".join(cells) + "</table>"


def _heads_table(heads: dict) -> str:
    if not heads.get("responses"):
        return "<p>no response to measure</p>"
    g = heads["groups"]
    rows = ["<tr><th>group</th><th>mean distance d</th><th>attention-sink share A[t, 0]</th>"
            "<th>mean distance without the sink</th></tr>"]
    for name in ("local", "global", "all"):
        rows.append(f"<tr><td>{name}</td><td class=n>{_f(g[name]['distance'], 2)}</td>"
                    f"<td class=n>{_f(g[name]['sink'])}</td><td class=n>{_f(g[name]['distance_no_sink'], 2)}</td></tr>")
    n = heads["responses"]
    per = ["<tr><th>layer</th><th>head</th><th>d</th><th>sink share</th><th>d without sink</th>"
           f"<th>local (of {n})</th><th>global (of {n})</th></tr>"]
    for h in heads["per_head"]:
        cls = ' class="loc"' if h["local"] * 2 > n else (' class="glob"' if h["global"] * 2 > n else "")
        per.append(f"<tr><td>{h['layer']}</td><td>{h['head']}</td><td class=n>{_f(h['distance'], 2)}</td>"
                   f"<td class=n>{_f(h['sink'])}</td><td class=n>{_f(h['distance_no_sink'], 2)}</td>"
                   f"<td{cls}>{h['local']}</td><td{cls}>{h['global']}</td></tr>")
    return ("<table>" + "".join(rows) + "</table><details><summary>every sampled head (mean over responses; "
            "blue: local in most responses, orange: global in most)</summary><table>" + "".join(per)
            + "</table></details>")


def _records_html(records: list[dict]) -> str:
    out = []
    for r in records:
        lines = [f"<details><summary>{_e(r['id'])}: {r['prompt_tokens']} prompt + {len(r['response_ids'])} "
                 f"response tokens{' — skipped: ' + _e(r['skipped']) if r.get('skipped') else ''}</summary>",
                 f"<div class=pre><b>prompt</b> {_e(r['prompt'])}\n\n<b>response</b> {_e(r['response'])}</div>"]
        if r.get("trials"):
            lines.append("<table><tr><th>kind</th><th>#</th><th>position</th><th>FAI</th><th>token → replacement"
                         "</th><th>Jaccard</th><th>continuation after the position</th></tr>")
            for t in r["trials"]:
                lines.append(f"<tr><td>{t['kind']}</td><td>{t['rank']}</td><td class=n>{t['position']}</td>"
                             f"<td class=n>{_f(t['fai'], 4)}</td><td><code>{_e(repr(t['original']))} → "
                             f"{_e(repr(t['replacement']))}</code></td><td class=n>{_f(t['jaccard'])}</td>"
                             f"<td class=pre>{_e(t['continuation'])}</td></tr>")
            lines.append("</table>")
        lines.append("</details>")
        out.append("".join(lines))
    return "".join(out)


def probe_html(result: dict) -> str:
    """The page of a probe result ({"settings", "summary", "records"} as ``run_probe`` returns it)."""
    summary, settings = result["summary"], result["settings"]
    jaccard_png, lift_png = _plots(result)
    meta = {key: value for key, value in settings.items() if key not in ("probe", "scorer")}
    meta["probe settings"] = ", ".join(f"{k}={v}" for k, v in settings["probe"].items())
    meta["scorer settings"] = ", ".join(f"{k}={v}" for k, v in settings["scorer"].items()) or "defaults"
    meta["prompts"] = f"{summary['prompts']} ({summary['with_trials']} with perturbation trials)"
    meta_rows = "".join(f"<tr><td><b>{_e(k)}</b></td><td>{_e(v)}</td></tr>" for k, v in meta.items())
    note = ("a = the first named sample, b = the second; differences a − b. Trials of one response share its text, "
            "so the per-trial rows count dependent pairs; the per-prompt row is the conservative test. Sign and "
            "Wilcoxon p-values are two-sided (Wilcoxon exact for up to 50 non-zero differences, normal "
            "approximation above); coupling p-values are the exact tail of the permutation baseline (anchors "
            "placed uniformly at random among the tokens with a valid FAI); the per-offset p-values are not corrected for "
            "the number of offsets. Definitions: docs/probe.md.")
    where = summary["perturbation"]["positions"]
    note += " Mean position of the perturbed tokens (fraction of the response) and mean FAI: " + "; ".join(
        f"{kind} {_f(v['mean'], 2)}, FAI {_f(v['mean_fai'], 4)}" for kind, v in where.items()) + "."
    skipped = "".join(f"<li>{_e(s['id'])}: {_e(s['reason'])}</li>" for s in summary["skipped"])
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>rhythm probe</title>"
            f"<style>{_CSS}</style></head><body><h1>rhythm probe: does the preplan-and-anchor rhythm exist in "
            f"this model?</h1><table class=meta>{meta_rows}</table>"
            f"<h2>Summary beside the paper</h2>{_summary_table(summary)}<p class=note>{_e(note)}</p>"
            + (f"<p class=note>skipped:</p><ul class=note>{skipped}</ul>" if skipped else "")
            + f"<h2>Plots</h2>{_png(jaccard_png, 'Jaccard pairs')} {_png(lift_png, 'coupling lift by offset')}"
            f"<h2>Coupling lift by offset</h2>{_lift_table(summary)}"
            f"<h2>Head groups</h2>{_heads_table(summary['heads'])}"
            f"<h2>Every prompt and trial</h2>{_records_html(result['records'])}</body></html>\n")
