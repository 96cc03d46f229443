"""The report on a terminal: the response with its preplan tokens and anchors marked, and the one rule for
printing user data (rollout text, ids, paths) to a terminal safely."""
from __future__ import annotations

import re

# C0 controls but newline and tab, DEL and the C1 controls: ESC (0x1b) starts CSI / OSC sequences, and 0x9b /
# 0x9d are CSI / OSC by themselves. Any of them in rollout text could recolour the terminal, move the cursor,
# rewrite earlier lines or set the window title.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` with every control character except newline and tab written as a visible escape (``\\x1b``)."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


PREPLAN, ANCHOR, BOTH = "36", "1;32", "1;35"   # ANSI colours of the marks


def terminal_view(report, colour: bool) -> str:
    """The response with preplan tokens ``[marked]``, anchors ``{marked}`` and tokens that are both
    ``[{marked}]``, a legend and the strongest anchors with the response rows behind their FAI (|T(s)|). The
    rollout's text is escaped (:func:`escape_controls`); colours only when ``colour``."""
    def paint(text, code):
        return f"\033[{code}m{text}\033[0m" if colour else text

    pieces = []
    for t in range(report.response_start, len(report.tokens)):
        tok = escape_controls(report.tokens[t])
        if report.anchor[t] and report.preplan[t]:
            tok = paint("[{" + tok + "}]", BOTH)
        elif report.anchor[t]:
            tok = paint("{" + tok + "}", ANCHOR)
        elif report.preplan[t]:
            tok = paint("[" + tok + "]", PREPLAN)
        pieces.append(tok)
    lines = ["".join(pieces), "",
             f"legend: {paint('[preplan]', PREPLAN)} = top-q |ΔWAAD| (local chunk starts), "
             f"{paint('{anchor}', ANCHOR)} = top-q FAI (tokens later tokens attend to), "
             f"{paint('[{both}]', BOTH)} = both", "", "strongest anchors:"]
    for i, tok, fai in report.strongest_anchors(10):
        behind = f" over {report.fai_rows[report.response_start + i]} rows" if report.fai_rows else ""
        lines.append(f"  #{i:<4d} {tok!r:<20} FAI {fai:.4f}{behind}")
    return "\n".join(lines)
