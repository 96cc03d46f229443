"""rhythm_kernels: the compute backends of attention-rhythm.

This folder (``kernels/``) installs as the package ``rhythm_kernels`` (pyproject.toml's ``package-dir``); it
imports nothing from ``rhythm``.

- ``naive``: the materialised oracle (tests only).
- ``torch_blocked``: the blocked pure-torch algorithm (CPU production path and fallback).
- ``triton_stats`` / ``triton_influence``: the fused Triton kernels (GPU; CPU under TRITON_INTERPRET=1), each
  keeping only its own loops; ``triton_common``: their launch plan, tile loads and interpreter shim;
  ``triton_metrics``: the backend entry point running both; ``tuned_configs``: pinned autotune picks read from
  ``tuned_configs.json`` (package data) beside it.
- ``segments``: the one description of padded and packed batches all of them share.
- ``layer_attention``: ``LayerAttention``, a layer's sliding window / chunks / softcap / sinks, taken by all of them.
"""
from .layer_attention import LayerAttention
from .segments import Segments, influence_counts, segments_from_cu_seqlens, segments_from_mask

__all__ = ["LayerAttention", "Segments", "influence_counts", "segments_from_cu_seqlens", "segments_from_mask"]
