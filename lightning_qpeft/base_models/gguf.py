"""GGUF files (llama.cpp's format) as ordinary Hugging Face model folders.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`, with the `gguf` package) and
dequantizes every tensor to float; the model it returns still carries the GGUF quantizer, which
`save_pretrained` refuses, so the converter removes it. The folder written here is float32 (the dequantized
values exactly: a Q4_1 weight is fp16 scale x 4-bit code + fp16 minimum), with the tokenizer, its chat template
and the generation config, and loads like any checkpoint, quantized again by bitsandbytes as
`model.quantization` says.

Config key: `model.base_model` may name a `.gguf` file; it is converted once into
`<cache>/gguf/<stem>-<md5 prefix>/` (`cache_dir()`; `LIGHTNING_QPEFT_CACHE` moves it) and loaded from there.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.utils.atomic import atomic_dir

PROVENANCE_FILE = "qpeft_source.json"


def cache_dir() -> Path:
    """The project's download and conversion cache: $LIGHTNING_QPEFT_CACHE, else ~/.cache/lightning_qpeft."""
    return Path(os.environ.get("LIGHTNING_QPEFT_CACHE") or Path.home() / ".cache" / "lightning_qpeft").expanduser()


def md5_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_gguf(name_or_path: str) -> bool:
    return str(name_or_path).lower().endswith(".gguf")


def check_gguf_file(path: Path, key: str) -> None:
    """Refuse, with the key, a path that is not a readable GGUF file (missing, a folder, wrong magic)."""
    if not path.exists():
        raise FileNotFoundError(f"{key}: no GGUF file at {str(path)!r}")
    if not path.is_file():
        raise ConfigError(key, f"{str(path)!r} is not a file", "give a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(key, f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                          "give a file written by llama.cpp's converters")


def convert_gguf(gguf_path: str | os.PathLike, output: str | os.PathLike, key: str = "model.base_model",
                 provenance: Optional[dict[str, Any]] = None) -> Path:
    """Write `output`: the GGUF file's model, dequantized to float32, with its tokenizer and generation config.

    The folder appears whole or not at all (`atomic_dir`); a file that is not GGUF, or that transformers cannot
    read (a truncated download), raises with `key` and nothing is left behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    check_gguf_file(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ImportError as e:
        raise ImportError(f"{key}: reading GGUF files needs the gguf package: pip install gguf ({e})") from None
    except Exception as e:  # gguf's reader raises many kinds on a torn file (ValueError, struct.error, ...)
        raise ConfigError(key, f"cannot read {str(path)!r} as a GGUF model ({type(e).__name__}: {e})",
                          "the file may be truncated: download it again") from None
    # the model is float now; the GGUF quantizer left on it makes save_pretrained refuse ("not serializable")
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = path.stem
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {"gguf_file": path.name, "md5": md5_of(path), **(provenance or {})}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(output)


def gguf_folder(name_or_path: str, key: str = "model.base_model") -> Path:
    """The converted folder of a `.gguf` base (converted on first use, then reused while the file is unchanged)."""
    path = Path(name_or_path).expanduser()
    check_gguf_file(path, key)
    folder = cache_dir() / "gguf" / f"{path.stem}-{md5_of(path)[:12]}"
    if (folder / PROVENANCE_FILE).exists():
        return folder
    return convert_gguf(path, folder, key, {"converted_from": str(path.resolve())})
