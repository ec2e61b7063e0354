"""Learning-rate schedules that need the run's total step count, which only the trainer knows.

Config key: `model.lr_scheduler`, e.g.

    lr_scheduler:
      class_path: lightning_qpeft.model.schedules.WarmupCosineLR
      init_args: {warmup_steps: 20}

torch has no single warmup-then-cosine class that takes only the optimizer (SequentialLR needs scheduler
objects), and `transformers.get_cosine_schedule_with_warmup` needs the total steps up front; this class gets
them from `trainer.estimated_stepping_batches` in `QPeftModule.configure_optimizers`. A warm-up that does not
end before the run does is warned about (short test runs of a config made for a long one are legitimate);
ranges of the fields are checked by the CLI before anything loads (`config_ranges.py`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lightning_qpeft.core.errors import ConfigError


class WarmupCosineLR(LambdaLR):
    """Linear warm-up to the optimizer's lr, then cosine decay to `min_lr_ratio` x lr (or constant).

    Args:
        optimizer: the optimizer.
        warmup_steps: steps of linear warm-up from 0.
        total_steps: optimizer steps of the whole run; None: taken from the trainer.
        min_lr_ratio: final lr as a fraction of the peak.
        decay: "cosine", or "constant" (QLoRA's schedule: constant after warm-up).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: Optional[int] = None,
        min_lr_ratio: float = 0.0,
        decay: str = "cosine",
    ) -> None:
        if decay not in ("cosine", "constant"):
            raise ConfigError("model.lr_scheduler.decay", f"{decay!r}", "choose cosine or constant")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        if total_steps is not None:
            self._check_warmup("model.lr_scheduler.init_args.total_steps")
        self.min_lr_ratio = min_lr_ratio
        self.decay = decay
        super().__init__(optimizer, self._factor)

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = max(1, total_steps)
        self._check_warmup("trainer.max_steps / trainer.max_epochs")

    def _check_warmup(self, keys: str) -> None:
        if self.total_steps is not None and self.warmup_steps >= self.total_steps:
            rank_zero_warn(
                f"model.lr_scheduler.init_args.warmup_steps: {self.warmup_steps} is not below the run's "
                f"{self.total_steps} optimizer steps ({keys}): the learning rate never reaches its peak; lower "
                "warmup_steps or lengthen the run"
            )

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay == "constant" or not self.total_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def needs_total_steps(scheduler: Any) -> bool:
    return isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None
