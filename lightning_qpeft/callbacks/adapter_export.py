"""Export the trained adapter with peft's `save_pretrained` at the end of fit, so plain peft loads it.

Config keys (`adapter_export.*`, a top-level section of the CLI config):
    dirpath:  where to write (default: `<log_dir>/adapter`, beside the TensorBoard events)
    enabled:  turn the export off

The folder holds `adapter_config.json` and `adapter_model.safetensors` (full fine-tuning: a whole model in
safetensors) and appears atomically. Its size on disk is logged as `adapter/size_bytes`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_qpeft.utils.atomic import atomic_dir


def folder_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class AdapterExport(Callback):
    """Write the adapter as a peft folder when fit ends (rank zero only).

    Args:
        dirpath: export folder; default `<trainer.log_dir>/adapter`.
        enabled: set False to skip the export.
    """

    def __init__(self, dirpath: Optional[str] = None, enabled: bool = True) -> None:
        self.dirpath = dirpath
        self.enabled = enabled
        self.last_path: Optional[Path] = None

    def resolve_dir(self, trainer: Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "adapter"

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        path = self.resolve_dir(trainer)
        if trainer.is_global_zero:
            with atomic_dir(path) as tmp:
                pl_module.model.save_pretrained(tmp, safe_serialization=True)
            size = folder_size(path)
            rank_zero_info(f"adapter exported to {path} ({size / 1024:.1f} KiB)")
            if trainer.logger is not None:
                trainer.logger.log_metrics({"adapter/size_bytes": size}, step=trainer.global_step)
        self.last_path = path
        trainer.strategy.barrier("adapter_export")
