"""Layer 2: recording the metrics inside a transformers model's own attention calls.

``architectures`` describes each taught model's layers, ``recording`` holds the AttentionInterface
function, ``flash`` runs FA2 on the other layers. May import: ``rhythm.metrics``, ``rhythm.config``,
``rhythm_kernels``.
"""
