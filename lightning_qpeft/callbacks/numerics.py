"""Non-finite losses and gradients: detected every optimizer step, handled by a configurable policy.

Config keys (`nonfinite.*`, a top-level section of the CLI config, on by default):
    policy:     skip (drop the optimizer step, count it, go on) | stop (end the run with an error)
    max_skips:  stop anyway after this many skipped steps in a row (a run that only skips is broken)

A NaN in any micro-batch reaches the accumulated gradients, so the check sits where the optimizer is about
to step (`on_before_optimizer_step`): a skipped step clears every gradient (AdamW leaves parameters whose
grad is None untouched), so the adapter never takes a NaN. `QPeftModule.on_save_checkpoint` refuses to write
non-finite tensors as a last line of defence. Skips are logged as `train/nonfinite_skips`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.core.tensors import all_finite


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under `nonfinite.policy=stop`."""


class NonFiniteGuard(Callback):
    """Skip or stop on a non-finite loss or gradient.

    Args:
        policy: "skip" drops the step and counts it; "stop" raises NonFiniteError.
        max_skips: consecutive skipped steps after which the run stops anyway.
    """

    metric_directions = {"train/nonfinite_skips": "lower"}  # which way it is better (metrics_file.py)

    def __init__(self, policy: str = "skip", max_skips: int = 20) -> None:
        if policy not in ("skip", "stop"):
            raise ConfigError("nonfinite.policy", repr(policy), "choose skip or stop")
        self.policy = policy
        self.max_skips = max_skips
        self.skipped = 0
        self._in_a_row = 0
        self._loss_finite: Any = True

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        # every micro-batch of an accumulation window passes here before the window's optimizer step. Kept on the
        # device: reading it here would make the CPU wait for the forward before it may queue the backward, and
        # a step whose CPU issues kernels slower than the GPU runs them loses that wait (the 7B config's step)
        self._loss_finite = torch.isfinite(loss.detach()).all() & self._loss_finite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all_finite(grads) & self._loss_finite  # read once, below: the step's one synchronisation
        self._loss_finite = True
        # every rank must take the same decision, or DDP ranks would drift apart
        finite = bool(trainer.strategy.reduce(finite.float(), reduce_op="min") > 0) if trainer.world_size > 1 \
            else bool(finite)
        if finite:
            self._in_a_row = 0
            return
        step = trainer.global_step
        if self.policy == "stop":
            raise NonFiniteError(f"non-finite gradient at step {step} (nonfinite.policy=stop); the last checkpoint "
                                 "is clean. Lower the learning rate, use bf16 rather than fp16, or set "
                                 "nonfinite.policy=skip")
        self.skipped += 1
        self._in_a_row += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        rank_zero_warn(f"non-finite gradient at step {step}: optimizer step skipped ({self.skipped} so far)")
        pl_module.log("train/nonfinite_skips", float(self.skipped), on_step=True, on_epoch=False)
        if self._in_a_row >= self.max_skips:
            raise NonFiniteError(f"{self._in_a_row} optimizer steps in a row had non-finite gradients "
                                 f"(nonfinite.max_skips={self.max_skips}); stopping")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
