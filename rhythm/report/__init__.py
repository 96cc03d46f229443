"""Layer 4: the per-sequence report of ``rhythm analyze`` (terminal, JSON, one self-contained HTML page).

May import: ``rhythm.scoring`` and below.
"""
