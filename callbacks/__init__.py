"""Everything that acts between steps: schedules, analyses, logging, export."""

from callbacks.export import ExportCallback, update_metrics_json
from callbacks.monitors import MaskRatioLogger, TokenThroughputMonitor

__all__ = ["ExportCallback", "MaskRatioLogger", "TokenThroughputMonitor", "update_metrics_json"]
