from lightning_qpeft.callbacks.adapter_export import AdapterExport
from lightning_qpeft.callbacks.numerics import NonFiniteGuard
from lightning_qpeft.callbacks.preemption import PreemptionCheckpoint
from lightning_qpeft.callbacks.prediction_writer import JsonlPredictionWriter

__all__ = ["AdapterExport", "JsonlPredictionWriter", "NonFiniteGuard", "PreemptionCheckpoint"]
