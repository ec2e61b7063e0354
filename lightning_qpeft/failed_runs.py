"""A run that fails before it trains leaves no half-made version folder behind.

The logger's version folder (`<save_dir>/<name>/version_N`) is made as soon as the run sets up: the config,
hyperparameters and an empty event file land there before the data is read, the model loaded or a checkpoint
restored, which is where most bad input is found. `removed_if_failed_early` (around `trainer.fit` in the CLI)
removes the folder again when the run that made it fails before its first training batch and nothing in it is
worth keeping (no checkpoint, no exported adapter), so the next run gets the same version number. A run that
fails after it started training keeps its folder: its logs say how it got there.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

KEPT = ("*.ckpt", "adapter_model.*")  # files that make a version folder worth keeping, failed or not


class _TrainingStarted(Callback):
    started = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.started = True


def new_version_folder(trainer: Any) -> Optional[Path]:
    """The version folder this run's logger will make, if it does not exist yet (asking fixes the number)."""
    log_dir = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
    if log_dir is None:
        return None
    folder = Path(log_dir)
    if folder.exists() or folder.resolve() == Path(trainer.default_root_dir).resolve():
        return None
    return folder


@contextmanager
def removed_if_failed_early(trainer: Any) -> Iterator[None]:
    """Remove the version folder this run made if the run fails before training and wrote nothing in `KEPT`."""
    folder = new_version_folder(trainer)
    started = _TrainingStarted()
    trainer.callbacks.append(started)
    try:
        yield
    except BaseException:
        if (folder is not None and folder.is_dir() and trainer.is_global_zero and not started.started
                and not any(any(folder.rglob(pattern)) for pattern in KEPT)):
            shutil.rmtree(folder, ignore_errors=True)
            rank_zero_info(f"removed {folder}: the run failed before training and left nothing to keep")
        raise
    finally:
        trainer.callbacks.remove(started)
