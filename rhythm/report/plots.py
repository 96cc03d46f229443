"""The report's pictures as PNG bytes (matplotlib, Agg backend): WAAD/FAI curves and the head groups'
attention bands."""
from __future__ import annotations

import io


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()


def _label(token: str) -> str:
    return repr(token)[1:-1][:12]


def curves_png(report) -> bytes:
    """WAAD (local heads) and FAI (global heads) over the response, preplan tokens and anchors marked."""
    plt = _pyplot()
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
    for i, token, f in report.strongest_anchors(5):
        ax2.annotate(_label(token), (i, f), fontsize=7, xytext=(2, 4), textcoords="offset points")
    ax2.set_ylabel("FAI")
    ax2.set_xlabel("response token index")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.grid(alpha=0.3)
    title = report.meta.get("title", "Preplan-and-anchor rhythm")
    fig.suptitle(f"{title} — layers {report.layers}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _masked_cmap(plt, name: str):
    return plt.get_cmap(name).with_extremes(bad="#d9d9d9")   # unobservable cells: grey, never the colour of 0


def _top(values) -> float:
    """The largest observed value (NaN cells ignored; 0 when there is none)."""
    import numpy as np

    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else 0.0


def _band(fig, ax, values, cmap: str, vmax: float, title: str, marks, colour: str, extent=None) -> None:
    """One band heatmap on ``ax``: ``values`` [lag, response token] from 0 to ``vmax`` in the colour map ``cmap``
    (NaN cells grey), its colour bar, and a faint vertical line of ``colour`` at each response token whose
    ``marks`` entry is true. extent: the image's (left, right, bottom, top) in data units (None: cell indices)."""
    im = ax.imshow(values, aspect="auto", origin="lower", cmap=_masked_cmap(_pyplot(), cmap), vmin=0, vmax=vmax,
                   interpolation="nearest", extent=extent)
    ax.set_ylabel("lag t - s")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, pad=0.01)
    for i in [i for i, mark in enumerate(marks) if mark]:
        ax.axvline(i, color=colour, lw=0.5, alpha=0.35)


def bands_png(report) -> bytes | None:
    """Two heatmaps over the response: the local group's attention on the first lags below the diagonal
    (row t, lag t - s), and the global group's horizon band by key column (column s, lag t - s), whose column
    means over the response rows are FAI. None when the report carries no bands."""
    if report.local_band is None or report.fai_band is None:
        return None
    import numpy as np

    plt = _pyplot()
    r0 = report.response_start
    # None (a cell nothing observes) becomes NaN, drawn in the colour maps' "bad" grey instead of as 0
    local = np.asarray(report.local_band, dtype=float)[r0:].T          # [lag, response t]
    columns = np.asarray(report.fai_band, dtype=float)[r0:].T          # [lag - H_lo, response s]
    h_lo = report.horizon[0]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    _band(fig, ax1, local, "Blues", max(_top(local[1:]) if local.shape[0] > 1 else 0.0, 1e-6),
          f"Local heads ({len(report.local_heads)}): attention A[t, t - lag] near the diagonal "
          f"(colour capped at the largest off-diagonal value)", report.response("preplan"), "#d62728")
    _band(fig, ax2, columns, "Oranges", max(_top(columns), 1e-6),
          f"Global heads ({len(report.global_heads)}): A[s + lag, s] by key column s, response rows "
          f"only (column mean = FAI); anchors marked", report.response("anchor"), "#2ca02c",
          extent=(-0.5, columns.shape[1] - 0.5, h_lo - 0.5, h_lo + columns.shape[0] - 0.5))
    ax2.set_xlabel("response token index (query row t above, key column s below)")
    fig.tight_layout()
    return _png(fig)
