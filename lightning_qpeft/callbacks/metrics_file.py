"""`metrics.jsonl`: every metric a run logs, as JSON lines beside its logs, whatever logger the run uses.

The CLI adds this logger to every run that has one (TensorBoard by default, or any `--trainer.logger`:
CSVLogger, WandbLogger, MLFlowLogger): each `log_metrics` call becomes one line `{"step": N, "name": value,
...}` in `<log_dir>/metrics.jsonl`. The study reads a cell's numbers from that file, so it works with every
logger, and anyone can read a run's metrics without TensorBoard.

Beside it, `metric_directions.json` says which way each metric is better: every object of the run that logs
metrics (the LightningModule, the data module, each callback) declares them where it logs them, as a mapping
`metric_directions = {"val/loss": "lower", "*/bleu": "higher", ...}` (names or fnmatch patterns; an exact name
wins over a pattern). Metrics nobody declares have no direction.
"""

from __future__ import annotations

import fnmatch
import json
import math
from argparse import Namespace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_qpeft.utils.atomic import atomic_file

FILE_NAME = "metrics.jsonl"
DIRECTIONS_FILE = "metric_directions.json"
DIRECTIONS = ("higher", "lower")


def declared_directions(trainer: Any) -> dict[str, str]:
    """The `metric_directions` every part of the run declares (module, data module, callbacks), merged."""
    owners = [getattr(trainer, "lightning_module", None), getattr(trainer, "datamodule", None),
              *(getattr(trainer, "callbacks", None) or [])]
    declared: dict[str, str] = {}
    for owner in owners:
        mapping = getattr(owner, "metric_directions", None)
        if isinstance(mapping, Mapping):
            declared.update(mapping)
    bad = {k: v for k, v in declared.items() if v not in DIRECTIONS}
    if bad:
        raise ValueError(f"metric_directions: {bad}; each direction is higher or lower")
    return declared


def direction_of(metric: str, directions: Mapping[str, str]) -> Optional[str]:
    """`higher` or `lower` for a metric name (its own entry, else the first pattern it matches); None: undeclared."""
    if metric in directions:
        return directions[metric]
    return next((d for pattern, d in directions.items() if fnmatch.fnmatchcase(metric, pattern)), None)


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
        self._directions: Optional[dict[str, str]] = None  # as last written

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
        self._write_directions()

    def _write_directions(self) -> None:
        directions = declared_directions(self._trainer)
        if directions != self._directions:
            with atomic_file(self.path.parent / DIRECTIONS_FILE, "w") as f:
                json.dump(directions, f, indent=1, sort_keys=True)
            self._directions = directions

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


def read_directions(log_dir: Path) -> dict[str, str]:
    """A run's `metric_directions.json` (empty when it has none)."""
    path = Path(log_dir) / DIRECTIONS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
