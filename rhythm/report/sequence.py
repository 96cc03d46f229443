"""Reports of one scored sequence: what the HTML page and its pictures show, and writing them.

``SequenceReport`` holds everything about one response: per-token signals, the selection, gammas, the head
groups with every head's mean distance and, when q and k were kept, exact attention bands. It may also hold
the GRPO group of completions that share the response's prompt. ``write_report`` writes
``<stem>.html`` (self-contained: pictures inlined as base64 PNG, no external files or scripts),
``<stem>.png`` (the WAAD/FAI curves, also inside the HTML) and ``<stem>.json`` (the numbers).
The page itself is built in ``rhythm.report.html``, the pictures in ``rhythm.report.plots``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

STRATEGIES = ("coupled", "local", "global", "random", "entropy")


@dataclass
class GroupMember:
    """One completion of a GRPO group: its response tokens, reward (None when the row gives advantages but no
    reward), advantage and per-token gamma."""

    id: str
    tokens: list[str]
    reward: float | None
    advantage: float
    gamma: list[float]
    selected: bool = False

    @property
    def shaped(self) -> list[float]:
        """advantage x gamma per response token (docs/definitions.md section 4, sign "both")."""
        return [self.advantage * g for g in self.gamma]


@dataclass
class SequenceReport:
    """Everything the report shows, for one sequence (lists over the sequence's real positions).

    tokens: token strings. response_start: index of the first response token. waad, fai: per-token
    signals. fai_rows: |T(s)|, the number of response rows behind each FAI value (0 where not valid).
    min_fai_rows: the opt-in minimum |T(s)| of anchor candidates (None: the paper's definition, any valid
    FAI). fai_valid, preplan, anchor, dominated, intro: bools. delta: abs(WAAD_t - WAAD_{t+1}) where
    defined (None elsewhere). intro_of: for dominated anchors the position of their intro token, else -1.
    gammas: strategy -> per-token gamma. entropy: per-token entropy or None. window, horizon: W and (H_lo,
    H_hi). layers, heads_per_layer, head_distance ([layer slot][head] mean response distance), local_heads,
    global_heads ((layer, head) pairs of H_loc / H_glob). local_band: [T][lag] head-mean attention of
    H_loc on lags 0..w-1 (query-anchored); fai_band: [T][lag] head-mean attention of H_glob on lags
    H_lo.. (key-anchored, response rows only: its column sums over abs(T(s)) are FAI); None on the cells
    nothing observes (the other end outside the sequence; for fai_band a prompt row). group: the GRPO group
    view, strategy of its gamma in group_strategy. meta: free-form header facts (model, timings ...).
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
    delta: list[float | None] = field(default_factory=list)
    intro_of: list[int] = field(default_factory=list)
    gammas: dict[str, list[float]] = field(default_factory=dict)
    entropy: list[float] | None = None
    window: int = 10
    horizon: tuple[int, int | None] = (10, 100)
    layers: list[int] = field(default_factory=list)
    heads_per_layer: int = 0
    head_distance: list[list[float]] = field(default_factory=list)
    local_heads: list[tuple[int, int]] = field(default_factory=list)
    global_heads: list[tuple[int, int]] = field(default_factory=list)
    local_band: list[list[float | None]] | None = None
    fai_band: list[list[float | None]] | None = None
    group: list[GroupMember] = field(default_factory=list)
    group_strategy: str = "coupled"
    meta: dict = field(default_factory=dict)
    fai_rows: list[int] = field(default_factory=list)
    min_fai_rows: int | None = None

    @classmethod
    def from_scores(cls, scores, tokens: list[str], index: int = 0, meta: dict | None = None,
                    strategies=STRATEGIES, min_fai_rows: int | None = None) -> "SequenceReport":
        """Build from ``RhythmScores`` (sequence ``index``; any input layout: its per-sequence rows).
        min_fai_rows: opt-in minimum |T(s)| of anchor candidates (None: the paper's definition)."""
        from rhythm.credit.heads import head_to_layer

        span = scores.segments.spans[index]
        rows, sel = scores.signals, scores.selection(min_fai_rows=min_fai_rows)

        def take(x):  # row ``index`` of a per-sequence [n_seq, L] tensor, over the sequence's positions
            return x[index, : span.length].tolist()

        gammas = {}
        for strategy in strategies:
            if strategy == "entropy" and rows.entropy is None:
                continue
            gammas[strategy] = scores.gamma(strategy)[span.row, span.start:span.end].tolist()
        delta = [d if ok else None for d, ok in zip(take(sel.delta), take(sel.delta_valid))]
        intro_of = take(sel.intro_of)   # positions in the sequence (-1: none)
        n_layers, heads = len(scores.layers), scores.heads_per_layer
        distance = scores.head_distance[index].reshape(n_layers, heads).tolist()

        def pairs(flat):
            return [tuple(int(x) for x in head_to_layer(int(i), heads, scores.layers)) for i in flat.tolist() if i >= 0]

        config = scores.config
        return cls(
            tokens=list(tokens), response_start=span.prompt_length,
            waad=take(rows.waad), fai=take(rows.fai), fai_valid=take(rows.fai_valid),
            preplan=take(sel.preplan), anchor=take(sel.anchor), dominated=take(sel.dominated),
            intro=take(sel.intro), delta=delta, intro_of=intro_of, gammas=gammas,
            entropy=None if rows.entropy is None else take(rows.entropy),
            window=config.window, horizon=tuple(config.horizon), layers=list(scores.layers), heads_per_layer=heads,
            head_distance=distance, local_heads=pairs(scores.groups.local[index]),
            global_heads=pairs(scores.groups.global_[index]), meta=dict(meta or {}),
            fai_rows=take(scores.fai_rows()), min_fai_rows=min_fai_rows)

    def response(self, name: str):
        return getattr(self, name)[self.response_start:]

    def strongest_anchors(self, n: int = 10) -> list[tuple[int, str, float]]:
        """(response index, token, FAI) of the top-n anchors by FAI (ties: lower position)."""
        items = [(i, self.tokens[self.response_start + i], f)
                 for i, (f, a) in enumerate(zip(self.response("fai"), self.response("anchor"))) if a]
        return sorted(items, key=lambda x: (-x[2], x[0]))[:n]

    def strongest_preplan(self, n: int = 10) -> list[tuple[int, str, float]]:
        """(response index, token, Delta) of the top-n preplan tokens by Delta (ties: lower position)."""
        items = [(i, self.tokens[self.response_start + i], d)
                 for i, (d, p) in enumerate(zip(self.response("delta"), self.response("preplan"))) if p]
        return sorted(items, key=lambda x: (-x[2], x[0]))[:n]

    def _repr_html_(self) -> str:
        """Notebook view: the report as one element (scoped CSS, ids unique to this call, no page-wide rules)."""
        from rhythm.report.html import new_uid, render_html

        return render_html(self, embed_pictures=True, fragment=True, uid=new_uid())


def write_report(report: SequenceReport, out_dir: str | Path, stem: str = "rhythm") -> dict[str, Path]:
    """Write ``<stem>.html`` (self-contained), ``<stem>.png`` and ``<stem>.json`` under out_dir; returns their
    paths."""
    from rhythm.report.html import render_html
    from rhythm.report.plots import curves_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"html": out_dir / f"{stem}.html", "png": out_dir / f"{stem}.png", "json": out_dir / f"{stem}.json"}
    curves = curves_png(report)
    paths["png"].write_bytes(curves)
    paths["html"].write_text(render_html(report, embed_pictures=True, curves=curves), encoding="utf-8")
    # strict JSON (no NaN / Infinity): what nothing observes is null (bands, a missing reward)
    paths["json"].write_text(json.dumps(asdict(report), default=float, allow_nan=False), encoding="utf-8")
    return paths
