"""attention-rhythm: exact attention-derived token credit for RL (arXiv 2510.13554), without attention maps."""
from rhythm_kernels.layer_attention import LayerAttention

from rhythm.metrics.attention import AttentionMetrics, attention_metrics
from rhythm.credit.heads import (HeadGroups, fixed_head_groups, head_to_layer, mean_response_distance, sample_layers,
                    select_head_groups, token_signals)
from rhythm.credit.selection import RhythmSelection, entropy_selection, rhythm_selection, top_q_mask
from rhythm.credit.gamma import random_selection
from rhythm.credit.shaping import credit_multipliers, shape_advantages

__all__ = ["AttentionMetrics", "LayerAttention", "attention_metrics"]
__all__ += ["HeadGroups", "fixed_head_groups", "head_to_layer", "mean_response_distance", "sample_layers",
            "select_head_groups", "token_signals"]
__all__ += ["RhythmSelection", "entropy_selection", "random_selection", "rhythm_selection", "top_q_mask"]
__all__ += ["credit_multipliers", "shape_advantages"]
from rhythm.scoring.scorer import RhythmScorer, RhythmScores, ScorerConfig, TokenSignals
from rhythm_kernels.segments import Span, to_response_tensor, trainer_response_mask
from rhythm.report import html as _report_html  # noqa: E402,F401  registers the notebook view of RhythmScores

__all__ += ["RhythmScorer", "RhythmScores", "ScorerConfig", "TokenSignals", "Span", "to_response_tensor",
            "trainer_response_mask"]
