"""Layer 1: from per-token signals to credit: head groups, the selection masks, gamma and advantage shaping.

Pure tensor code, no model. May import: ``rhythm.config``, ``rhythm.metrics``.
"""
