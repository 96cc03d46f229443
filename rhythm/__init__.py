"""attention-rhythm: exact attention-derived token credit for RL (arXiv 2510.13554), without attention maps."""
from .metrics import AttentionMetrics, attention_metrics

__all__ = ["AttentionMetrics", "attention_metrics"]
