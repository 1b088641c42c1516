"""Everything that acts between steps: schedules, analyses, logging, export."""

from callbacks.adaptive_masking import AdaptiveMaskingCallback
from callbacks.attention_probe import AttentionProbeCallback
from callbacks.entropy_analysis import EntropyAnalysisCallback
from callbacks.entropy_masking import EntropyMaskingCallback
from callbacks.evaluation import EvaluationCallback
from callbacks.export import ExportCallback, update_metrics_json
from callbacks.monitors import MaskRatioLogger, TokenThroughputMonitor
from callbacks.ratio_schedule import MaskRatioSchedule

__all__ = [
    "AdaptiveMaskingCallback",
    "AttentionProbeCallback",
    "EntropyAnalysisCallback",
    "EntropyMaskingCallback",
    "EvaluationCallback",
    "ExportCallback",
    "MaskRatioLogger",
    "MaskRatioSchedule",
    "TokenThroughputMonitor",
    "update_metrics_json",
]
