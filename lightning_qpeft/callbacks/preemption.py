"""Preemption: on SIGTERM (a cluster taking the node back), save a checkpoint, then exit with status 143.

Config keys (`preemption.*`, a top-level section of the CLI config, on by default):
    enabled:  turn it off

Lightning already turns SIGTERM into a flag that every rank sees at the next batch boundary and then
raises `SIGTERMException`; it saves nothing unless SLURM requeueing is set up, and the process exits with
status 0, as if the run had finished. This callback saves `last.ckpt` in the run's checkpoint folder: at
the end of the batch during which the signal came (the batch complete, the loop state consistent, the same
moment `ModelCheckpoint` saves at), or, when the signal came after that hook had run, as Lightning's
exception unwinds (the batch also complete). `fit --ckpt_path last` resumes where the job was stopped, and
`cli.main` exits with 143 (128 + SIGTERM), so a job script can tell a stopped run from a finished one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(Callback):
    """Save `last.ckpt` when SIGTERM arrives during training.

    Args:
        enabled: set False to leave SIGTERM to Lightning alone.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.saved_to: Path | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # one process only: saving is collective (a barrier, FSDP's gather), and on several ranks the flag is
        # each rank's own until Lightning broadcasts it at the next batch start, where all ranks raise together
        # and on_exception below saves on all of them
        if getattr(trainer, "received_sigterm", False) and trainer.world_size == 1:
            self._save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # the signal came after this batch's on_train_batch_end: Lightning raises at the batch boundary
        if isinstance(exception, SIGTERMException) and trainer.training:
            self._save(trainer)

    def _save(self, trainer: Trainer) -> None:
        if not self.enabled or self.saved_to is not None:
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
                       f"fit --ckpt_path last (or {path})")
