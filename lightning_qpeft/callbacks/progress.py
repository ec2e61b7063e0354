"""The progress bar of every run: Lightning's, plus tokens/s and the whole run's remaining time.

`tok/s` is the efficiency monitor's last window (real, non-pad tokens a second, summed over GPUs; it appears
after `efficiency.warmup_steps + efficiency.window` steps); `eta` is the time left to `trainer.max_steps` (or
the run's estimated optimizer steps) at the mean step time since training started, where Lightning's own bar
shows only the epoch's.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_qpeft.callbacks.efficiency import EfficiencyMonitor


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class QPeftProgressBar(TQDMProgressBar):
    """TQDM progress bar with `tok/s` and the run's `eta`."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._start: Optional[tuple[float, int]] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = (time.perf_counter(), trainer.global_step)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, EfficiencyMonitor)), None)
        if monitor is not None and monitor.history:
            items["tok/s"] = f"{monitor.history[-1]['perf/tokens_per_s']:,.0f}"
        eta = self.eta_seconds(trainer)
        if eta is not None:
            items["eta"] = _clock(eta)
        return items

    def eta_seconds(self, trainer: Trainer) -> Optional[float]:
        """Seconds left to the run's last optimizer step, at the mean step time so far (None: unknown yet)."""
        if self._start is None or trainer.state.fn != "fit":
            return None
        began, first = self._start
        done = trainer.global_step - first
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if done <= 0 or total in (None, float("inf")):
            return None
        return max(0.0, (time.perf_counter() - began) / done * (total - trainer.global_step))
