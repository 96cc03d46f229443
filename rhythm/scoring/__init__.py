"""Layer 3: ``RhythmScorer``, a capture pass plus the credit: per-sequence scores and gamma.

May import: ``rhythm.capture``, ``rhythm.credit``, ``rhythm.metrics``, ``rhythm.config``.
"""
