"""Write `predict` outputs as JSON lines: one object a record (its fields and `prediction`).

Config keys (`prediction_writer.*`, a top-level section of the CLI config):
    path:  output file (default `<log_dir>/predictions.jsonl`); under several processes each rank writes
           `<stem>.rank<N>.jsonl`
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_qpeft.utils.atomic import atomic_file


class JsonlPredictionWriter(BasePredictionWriter):
    """Collects every prediction and writes the file once, atomically, when predict ends.

    Args:
        path: output file; default `<trainer.log_dir>/predictions.jsonl`.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path
        self.last_path: Optional[Path] = None

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        rows = [row for batch in predictions for row in batch]
        with atomic_file(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.last_path = path
        rank_zero_info(f"{len(rows)} predictions written to {path}")
