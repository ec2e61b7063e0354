"""Preemption: on SIGTERM (a cluster taking the node back), save a checkpoint, then exit.

Config keys (`preemption.*`, a top-level section of the CLI config, on by default):
    enabled:  turn it off

Lightning already turns SIGTERM into a flag that every rank sees at the next batch boundary and then
raises `SIGTERMException`; it saves nothing unless SLURM requeueing is set up. This callback saves
`last.ckpt` in the run's checkpoint folder at that boundary (the batch is complete, the loop state
consistent), so `fit --ckpt_path last` (or the file's path) resumes where the job was stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class PreemptionCheckpoint(Callback):
    """Save `last.ckpt` when SIGTERM arrives.

    Args:
        enabled: set False to leave SIGTERM to Lightning alone.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.saved_to: Path | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled or not getattr(trainer, "received_sigterm", False) or self.saved_to is not None:
            return
        ckpt = trainer.checkpoint_callback
        dirpath = Path(ckpt.dirpath) if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath else \
            Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        path = dirpath / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(str(path))
        if isinstance(ckpt, ModelCheckpoint):
            ckpt.last_model_path = str(path)
        self.saved_to = path
        rank_zero_info(f"SIGTERM: checkpoint saved to {path} at step {trainer.global_step}; resume with "
                       f"fit --ckpt_path {path}")
