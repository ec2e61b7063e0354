"""The progress bar shows the efficiency monitor's last tokens/s and the whole run's remaining time."""

import time
from types import SimpleNamespace

from lightning_qpeft.callbacks.efficiency import EfficiencyMonitor
from lightning_qpeft.callbacks.progress import QPeftProgressBar, _clock


def test_eta_is_the_mean_step_time_so_far_times_the_steps_left():
    bar = QPeftProgressBar()
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), global_step=10, max_steps=100,
                              estimated_stepping_batches=100)
    assert bar.eta_seconds(trainer) is None  # before training starts
    bar._start = (time.perf_counter() - 20.0, 0)  # 10 steps in 20 s
    assert abs(bar.eta_seconds(trainer) - 180.0) < 1.0  # 90 steps left at 2 s
    trainer.max_steps = -1  # no max_steps: the run's estimated optimizer steps
    trainer.estimated_stepping_batches = 20
    assert abs(bar.eta_seconds(trainer) - 20.0) < 1.0
    assert _clock(3725) == "1:02:05" and _clock(65) == "01:05"


def test_the_bar_shows_tokens_per_second_from_the_efficiency_monitor(monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: {"train/loss": "1.0"})
    monitor = EfficiencyMonitor()
    monitor.history = [{"perf/tokens_per_s": 12345.6}]
    trainer = SimpleNamespace(callbacks=[monitor], state=SimpleNamespace(fn="fit"), global_step=0)
    items = QPeftProgressBar().get_metrics(trainer, None)
    assert items == {"train/loss": "1.0", "tok/s": "12,346"}
