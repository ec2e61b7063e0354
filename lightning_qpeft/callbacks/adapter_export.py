"""Export the trained adapter with peft's `save_pretrained` at the end of fit, so plain peft loads it.

Config keys (`adapter_export.*`, a top-level section of the CLI config):
    dirpath:  where to write (default: `<log_dir>/adapter`, beside the TensorBoard events)
    enabled:  turn the export off

The folder holds `adapter_config.json` and `adapter_model.safetensors` (full fine-tuning: a whole model
folder, config, safetensors and tokenizer, loadable with `from_pretrained`) and `qpeft_training.json` (the
base, quantization and method it was trained with: `merge` dequantizes the same quantization; for chat data,
the chat template when it was not the tokenizer's own and the default system prompt, which `chat` uses). It appears
atomically. Its size on disk is logged as `adapter/size_bytes`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_qpeft.core.versions import library_versions
from lightning_qpeft.data.chat_tokens import training_record
from lightning_qpeft.model.adapters import TRAINING_FILE
from lightning_qpeft.utils.atomic import atomic_dir


def folder_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def export_model(model: nn.Module, path: str | os.PathLike, training: Optional[dict[str, Any]] = None,
                 tokenizer: Any = None, state_dict: Optional[dict[str, Any]] = None) -> int:
    """Write a peft model's adapter (or a fully fine-tuned model) to `path` atomically; returns its size.

    Args:
        model: a `PeftModel` (its adapter is written) or a transformers model (all of it is).
        path: the folder to (re)place.
        training: what it was trained with, written to `qpeft_training.json`.
        tokenizer: saved beside a full model (an adapter needs its base's tokenizer, which `merge` adds).
        state_dict: the model's state, when it cannot be read from `model` on one rank alone (FSDP shards).
    """
    from peft import PeftModel

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None and not isinstance(model, PeftModel):
            tokenizer.save_pretrained(tmp)
        if training is not None:
            (tmp / TRAINING_FILE).write_text(json.dumps(training, indent=2) + "\n")
    return folder_size(path)


def training_info(pl_module: LightningModule) -> dict[str, Any]:
    """The settings an adapter belongs to (QPeftModule's), for `qpeft_training.json`."""
    config = getattr(pl_module, "config", None)  # the run configuration the module's plan resolves
    settings = ("quantization", "compute_dtype", "quant_storage", "upcast_norms", "quantized_outputs")
    return {**{k: getattr(pl_module, k) for k in ("base_model", "method") if hasattr(pl_module, k)},
            **{k: getattr(config, k) for k in settings if hasattr(config, k)}, "versions": library_versions()}


class AdapterExport(Callback):
    """Write the adapter as a peft folder when fit ends (rank zero only).

    Args:
        dirpath: export folder; default `<trainer.log_dir>/adapter`.
        enabled: set False to skip the export.
    """

    metric_directions = {"adapter/size_bytes": "lower"}  # which way it is better (metrics_file.py)

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
        state_dict = None
        if isinstance(trainer.strategy, FSDPStrategy):
            # the adapter is sharded: every rank takes part in gathering it (to rank 0); reading it on rank 0
            # alone would wait forever for the others
            state_dict = {k.removeprefix("model."): v for k, v in trainer.strategy.lightning_module_state_dict().items()}
        if trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
            training = {**training_info(pl_module), **training_record(trainer.datamodule)}  # chat renders as trained
            size = export_model(pl_module.model, path, training, tokenizer, state_dict)
            rank_zero_info(f"adapter exported to {path} ({size / 1024:.1f} KiB)")
            for logger in trainer.loggers:
                logger.log_metrics({"adapter/size_bytes": size}, step=trainer.global_step)
        self.last_path = path
        trainer.strategy.barrier("adapter_export")
