"""`model.base_model` -> the folder or hub id to load: a hub id, a local folder, `random:<shape>`, a built-in
model folder (created on first use), or a `.gguf` file (converted into a cached folder once).

The model loader (`model/loading.py`) and the data module's tokenizer (`tokenizer.py`) resolve a name the same
way, here; messages name the config key the value came from.
"""

from __future__ import annotations

from pathlib import Path

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.base_models.gguf import gguf_folder, is_gguf
from lightning_qpeft.base_models.tiny import BUILTIN_MODELS

RANDOM_PREFIX = "random:"  # random weights of a real shape, built in memory (model/random_init.py)
REMOTE_CODE_HINT = ("; its code would run on load: set model.trust_remote_code=true only if you have read it "
                    "and trust it")


def is_random(name: str) -> bool:
    return name.startswith(RANDOM_PREFIX)


def first_line(e: BaseException) -> str:
    """An exception's first line (a loader's message can run to a traceback's length)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def resolve_base_model(name_or_path: str, key: str = "model.base_model", need_config: bool = True) -> str:
    """The path or hub id to load; builds a built-in model folder on first use.

    Args:
        name_or_path: the config value.
        key: the config key it came from (for messages).
        need_config: a local folder must hold config.json (a tokenizer folder need not).
    """
    if is_random(name_or_path):
        return name_or_path
    if is_gguf(name_or_path):  # llama.cpp's file: dequantized into a cached model folder once
        return str(gguf_folder(name_or_path, key))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or (need_config and not (path / "config.json").exists()):
            raise ConfigError(key, f"{str(path)!r} is not a model folder (no config.json in it)",
                              "give a folder written by save_pretrained, or a hub id")
        return str(path)
    if path.name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[path.name](path))
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{key}: no folder at {name_or_path!r}")
    return name_or_path  # a hub id: transformers resolves (and, with the hub, downloads) it
