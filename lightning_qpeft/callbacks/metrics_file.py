"""`metrics.jsonl`: every metric a run logs, as JSON lines beside its logs, whatever logger the run uses.

The CLI adds this logger to every run that has one (TensorBoard by default, or any `--trainer.logger`:
CSVLogger, WandbLogger, MLFlowLogger): each `log_metrics` call becomes one line `{"step": N, "name": value,
...}` in `<log_dir>/metrics.jsonl`. The study reads a cell's numbers from that file, so it works with every
logger, and anyone can read a run's metrics without TensorBoard.
"""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

FILE_NAME = "metrics.jsonl"


class MetricsFile(Logger):
    """Append every logged metric to `<log_dir>/metrics.jsonl` (rank zero only).

    Args:
        trainer: the run's trainer: the file goes to its first logger's folder (what `trainer.log_dir` names,
            read without `log_dir`'s broadcast, which only rank zero would reach), and it reports that logger's
            version (the progress bar shows one `v_num`).
    """

    def __init__(self, trainer: Any) -> None:
        super().__init__()
        self._trainer = trainer
        self._path: Optional[Path] = None

    @property
    def name(self) -> str:
        return "metrics_file"

    @property
    def version(self) -> Union[int, str, None]:
        first = self._trainer.loggers[0] if self._trainer.loggers else None
        return first.version if first is not None and first is not self else None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = Path(self._log_dir()) / FILE_NAME
            self._path.parent.mkdir(parents=True, exist_ok=True)
        return self._path

    def _log_dir(self) -> str:
        # trainer.log_dir without its broadcast: only rank zero logs, and a collective there would wait forever
        # for the other ranks (the same folder: the first logger's)
        first = self._trainer.loggers[0] if self._trainer.loggers else None
        if first is None or first is self:
            return self._trainer.default_root_dir
        folder = getattr(first, "log_dir", None) or first.save_dir
        return folder or self._trainer.default_root_dir

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        row = {"step": step}
        for key, value in metrics.items():
            value = float(value.item() if hasattr(value, "item") else value)
            row[key] = value if math.isfinite(value) else str(value)  # JSON has no NaN/Inf
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    @rank_zero_only
    def log_hyperparams(self, params: Union[dict[str, Any], Namespace], *args: Any, **kwargs: Any) -> None:
        return  # config.yaml holds the resolved configuration


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """`metrics.jsonl` -> name -> [(step, value), ...] in the order they were logged."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step = row.pop("step", None)
        for key, value in row.items():
            out.setdefault(key, []).append((step if step is not None else -1, float(value)))
    return out
