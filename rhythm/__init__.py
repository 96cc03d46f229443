"""attention-rhythm: exact attention-derived token credit for RL (arXiv 2510.13554), without attention maps."""
from rhythm_kernels.layer_attention import LayerAttention

from .metrics import AttentionMetrics, attention_metrics
from .heads import (HeadGroups, fixed_head_groups, head_to_layer, mean_response_distance, sample_layers,
                    select_head_groups, token_signals)
from .selection import RhythmSelection, entropy_selection, random_selection, rhythm_selection, top_q_mask
from .credit import credit_multipliers, shape_advantages

__all__ = ["AttentionMetrics", "LayerAttention", "attention_metrics"]
__all__ += ["HeadGroups", "fixed_head_groups", "head_to_layer", "mean_response_distance", "sample_layers",
            "select_head_groups", "token_signals"]
__all__ += ["RhythmSelection", "entropy_selection", "random_selection", "rhythm_selection", "top_q_mask"]
__all__ += ["credit_multipliers", "shape_advantages"]
from .scorer import RhythmScorer, RhythmScores, ScorerConfig, to_response_tensor, trainer_response_mask

__all__ += ["RhythmScorer", "RhythmScores", "ScorerConfig", "to_response_tensor", "trainer_response_mask"]
