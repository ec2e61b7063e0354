"""Checkpoint files: written atomically, read without unpickling code.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the
system temp folder, so the final move can be a copy across filesystems and a kill mid-copy leaves a torn
file at the checkpoint's path. `AtomicCheckpointIO` writes beside the target, fsyncs and renames; it reads
with `torch.load(weights_only=True)` so a crafted checkpoint cannot run code (our checkpoints hold tensors
and plain data only: see `QPeftModule.on_save_checkpoint`).

The CLI installs it by default (`trainer.plugins`).
"""

from __future__ import annotations

import pickle
import re
from typing import Any, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_qpeft.utils.atomic import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic, code-free checkpoint IO (see module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        with atomic_file(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"ckpt_path: no checkpoint at {str(path)!r}") from None
        except pickle.UnpicklingError as e:
            culprit = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
            if culprit:
                raise ValueError(
                    f"ckpt_path: {str(path)!r} holds more than tensors and plain data (refused: loading it could "
                    f"run code; it names {culprit.group(1)})"
                ) from None
            raise ValueError(f"ckpt_path: {str(path)!r} is not a readable checkpoint") from None
        except (RuntimeError, EOFError) as e:
            raise ValueError(f"ckpt_path: {str(path)!r} is not a readable checkpoint ({e})") from None
