"""rhythm_kernels: the compute backends of attention-rhythm.

- ``naive``: the materialised oracle (tests only).
- ``torch_blocked``: the blocked pure-torch algorithm (CPU production path and fallback).
- ``triton_stats`` / ``triton_influence``: the fused Triton kernels (GPU; CPU under TRITON_INTERPRET=1).
- ``segments``: the one description of padded and packed batches all of them share.
"""
from .segments import Segments, influence_counts, segments_from_cu_seqlens, segments_from_mask

__all__ = ["Segments", "influence_counts", "segments_from_cu_seqlens", "segments_from_mask"]
