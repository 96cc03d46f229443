"""Layer 1: the attention metrics (WAAD, FAI, distance, lse) of one call, over the ``rhythm_kernels`` backends.

May import: ``rhythm_kernels``, ``rhythm.config``.
"""
