from lightning_qpeft.callbacks.adapter_export import AdapterExport
from lightning_qpeft.callbacks.efficiency import EfficiencyMonitor
from lightning_qpeft.callbacks.generation_metrics import GenerationMetrics
from lightning_qpeft.callbacks.mmlu import MMLUEvaluation
from lightning_qpeft.callbacks.numerics import NonFiniteGuard
from lightning_qpeft.callbacks.preemption import PreemptionCheckpoint
from lightning_qpeft.callbacks.prediction_writer import JsonlPredictionWriter

__all__ = ["AdapterExport", "EfficiencyMonitor", "GenerationMetrics", "JsonlPredictionWriter", "MMLUEvaluation", "NonFiniteGuard",
           "PreemptionCheckpoint"]
