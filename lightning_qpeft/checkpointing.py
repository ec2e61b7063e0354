"""Checkpoint files: written atomically, read without unpickling code.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the
system temp folder, so the final move can be a copy across filesystems and a kill mid-copy leaves a torn
file at the checkpoint's path. `AtomicCheckpointIO` writes beside the target, fsyncs and renames; it reads
with `torch.load(weights_only=True)` so a crafted checkpoint cannot run code (our checkpoints hold tensors
and plain data only: see `model/checkpoint.py`).

The CLI installs it by default (`trainer.plugins`). `checkpoint_problem` tells a torn file (truncated, or a
member whose CRC does not match) from an intact one without unpickling it: `--ckpt_path last` skips torn ones.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_qpeft.core.errors import ConfigError
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
                raise ConfigError(
                    "ckpt_path", f"{str(path)!r} holds more than tensors and plain data (refused: loading it could "
                    f"run code; it names {culprit.group(1)})"
                ) from None
            raise ConfigError("ckpt_path", f"{str(path)!r} is not a readable checkpoint") from None
        except (RuntimeError, EOFError) as e:
            raise ConfigError("ckpt_path", f"{str(path)!r} is not a readable checkpoint ({e})") from None


CRC_CHECKED_BYTES = 64 << 20  # members up to this size are read whole to check their CRC (tensors beyond: sizes)


def checkpoint_problem(path: _PATH) -> Optional[str]:
    """Why a checkpoint file is torn (None: it looks intact).

    torch.save writes a zip archive: a truncated file has no central directory, and a member whose bytes changed
    fails its CRC-32. Members up to `CRC_CHECKED_BYTES` (the pickle and an adapter's tensors) are read whole;
    larger ones (a fully fine-tuned model's) are only checked to lie within the file.
    """
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.file_size <= CRC_CHECKED_BYTES:
                    archive.read(info)
                elif info.header_offset + info.compress_size > size:
                    return f"{info.filename} runs past the end of the file"
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return str(e) or type(e).__name__
    return None


def rng_states() -> dict[str, Any]:
    """The random generators' states as tensors and plain data (loadable with weights_only=True).

    Lightning does not checkpoint them; without them a resumed run draws other dropout masks than an unbroken
    one from the resume step on. numpy's state is unpacked because an ndarray would need unpickling code.
    """
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this rank's device (ranks start from one seed)
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
