"""Content-word Jaccard of two continuations (the paper's Table 1 measure of how far a continuation moved).

Words are maximal runs of letters (an apostrophe inside a word kept) or numbers (``3``, ``2.5``, ``1,200``),
lower-cased; content words are those not in :data:`STOPWORDS` (English function words). The measure is
the Jaccard index of the two sets, |A & B| / |A | B|, and 1.0 when both are empty (nothing differs).
"""
from __future__ import annotations

import re

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*|\d+(?:[.,]\d+)*")

STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers
herself him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more
most mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own same
shan't she she'd she'll she's should shouldn't so some such than that that's the their theirs them
themselves then there there's these they they'd they'll they're they've this those through to too under
until up very was wasn't we we'd we'll we're we've were weren't what what's when when's where where's which
while who who's whom why why's with won't would wouldn't you you'd you'll you're you've your yours yourself
yourselves s t will just also so now let us
""".split())


def content_words(text: str) -> set[str]:
    """The set of lower-cased content words and numbers of ``text``."""
    return {w for w in (m.group(0).lower() for m in WORD.finditer(text)) if w not in STOPWORDS}


def jaccard(a: str, b: str) -> float:
    """Content-word Jaccard index of two texts (1.0 when neither has a content word)."""
    x, y = content_words(a), content_words(b)
    union = x | y
    return len(x & y) / len(union) if union else 1.0


def printable(text, keep: str = "") -> str:
    """User or model text made safe for a terminal or a page: control characters (but those in ``keep``)
    written as Python escapes (``\\x1b``)."""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in str(text))
