"""Quantization modes: a short name per mode, mapped to a `transformers.BitsAndBytesConfig`.

Config keys (on `QPeftModule`):
    model.quantization:   none | nf4 | nf4-dq | fp4 | fp4-dq | int8
    model.compute_dtype:  dtype of the 4-bit matmuls (bfloat16 | float16 | float32)
    model.quant_storage:  storage dtype of packed 4-bit weights (uint8, or the compute dtype for FSDP)

The modes are QLoRA's: NF4 (4-bit NormalFloat) and FP4, each with or without double quantization of the
absmax constants, and LLM.int8(). `none` loads the weights unquantized in `model.dtype`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import BitsAndBytesConfig

from lightning_qpeft.core.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class QuantMode:
    """One quantization mode.

    Attributes:
        name: the config value.
        bits: 4, 8 or 16/32 for unquantized (`None`).
        quant_type: bitsandbytes' 4-bit data type (`nf4` or `fp4`), `None` otherwise.
        double_quant: whether the absmax constants are quantized again (QLoRA's "DQ").
        description: one line for tables and help.
    """

    name: str
    bits: Optional[int]
    quant_type: Optional[str] = None
    double_quant: bool = False
    description: str = ""

    @property
    def is_quantized(self) -> bool:
        return self.bits is not None

    @property
    def is_4bit(self) -> bool:
        return self.bits == 4


QUANT_MODES: dict[str, QuantMode] = {
    m.name: m
    for m in (
        QuantMode("none", None, description="unquantized weights in model.dtype"),
        QuantMode("nf4", 4, "nf4", description="4-bit NormalFloat (QLoRA)"),
        QuantMode("nf4-dq", 4, "nf4", True, description="4-bit NormalFloat + double quantization (QLoRA default)"),
        QuantMode("fp4", 4, "fp4", description="4-bit float"),
        QuantMode("fp4-dq", 4, "fp4", True, description="4-bit float + double quantization"),
        QuantMode("int8", 8, description="LLM.int8() with outlier decomposition"),
    )
}


def get_quant_mode(name: str) -> QuantMode:
    """The mode called `name`; a clear error naming the config key otherwise."""
    try:
        return QUANT_MODES[name]
    except KeyError:
        raise ConfigError("model.quantization", f"unknown mode {name!r}",
                          f"choose one of {', '.join(QUANT_MODES)}") from None


def resolve_dtype(name: str, key: str) -> torch.dtype:
    """`torch.dtype` for a config string, naming `key` when the string is unknown."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(key, f"unknown dtype {name!r}", f"choose one of {', '.join(DTYPES)}") from None


def bnb_config(
    mode: str | QuantMode, compute_dtype: str = "bfloat16", quant_storage: str = "uint8"
) -> Optional[BitsAndBytesConfig]:
    """The `BitsAndBytesConfig` for a mode, or `None` for `none`.

    Args:
        mode: a name from `QUANT_MODES` (or the mode itself).
        compute_dtype: dtype the 4-bit layers dequantize to for their matmuls.
        quant_storage: dtype the packed 4-bit weights are stored as. FSDP can only shard float tensors, so
            FSDP needs it equal to the compute dtype; `uint8` otherwise.
    """
    mode = get_quant_mode(mode) if isinstance(mode, str) else mode
    if not mode.is_quantized:
        return None
    if mode.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = torch.uint8 if quant_storage == "uint8" else resolve_dtype(quant_storage, "model.quant_storage")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=mode.quant_type,
        bnb_4bit_use_double_quant=mode.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(compute_dtype, "model.compute_dtype"),
        bnb_4bit_quant_storage=storage,
    )

