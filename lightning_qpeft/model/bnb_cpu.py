"""bitsandbytes' 4-bit layers on the CPU: correct, and the same on every processor.

Two of bitsandbytes' CPU paths (0.50.2) depend on the processor, and one of them is wrong:
- its native CPU dequantization kernel, on AVX-512 processors, dequantizes a (rows, cols) weight wrongly when
  cols is even but not a multiple of the block size (64): values off by up to ~2 (tests/model/test_bnb_cpu.py),
  while the same packed bytes dequantized as one flat vector are right. Blocks run over the flattened weight,
  so `install` registers a CPU kernel for `bitsandbytes::dequantize_4bit` that calls the native routine on the
  flat vector (every 4-bit matmul goes through that op: the forward's `gemm_4bit`, the backward's dequantize);
- on a processor with AVX512-BF16 a 4-bit layer repacks its weight in place for another kernel the first time it
  runs in eval mode without gradients (generation, MMLU): that kernel needs out_features divisible by 32 and
  rounds differently from the training path; `pin_cpu_kernels` turns that off, so every CPU computes as CI does.
"""

from __future__ import annotations

import ctypes
import warnings
from math import prod
from typing import Optional, Sequence

import torch
from torch import nn

_LIBRARY: Optional[torch.library.Library] = None  # kept alive: the registration lasts as long as this object
_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def install() -> None:
    """Register the flat CPU dequantization for `bitsandbytes::dequantize_4bit` (once per process)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    import bitsandbytes  # noqa: F401  (defines the op and its own CPU kernel, which this one replaces)

    library = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": that is the point
        library.impl("dequantize_4bit", dequantize_4bit_cpu, "CPU", allow_override=True)
    _LIBRARY = library


def dequantize_4bit_cpu(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                        shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' CPU dequantization of the flattened weight, reshaped: (rows, cols) weights whose cols are
    not whole blocks come out right. Where its native routine does not apply (an odd count, blocks of 2048 or
    more, a missing symbol), the same arithmetic in torch ops (`traced_dequant`)."""
    from bitsandbytes.cextension import lib

    n = prod(shape)
    routine = getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{_SUFFIX.get(dtype, '')}", None)
    if n % 2 or blocksize >= 2048 or routine is None:
        from lightning_qpeft.model.traced_dequant import dequantize_4bit_torch

        return dequantize_4bit_torch(A, absmax.float(), blocksize, quant_type, shape, dtype)
    packed = (A if A.dtype == torch.uint8 else A.view(torch.uint8)).contiguous()
    scales = absmax.float().contiguous()
    out = torch.empty(n, dtype=dtype)
    pointer = ctypes.c_void_p
    routine(pointer(packed.data_ptr()), pointer(scales.data_ptr()), pointer(out.data_ptr()),
            ctypes.c_longlong(blocksize), ctypes.c_longlong(1), ctypes.c_longlong(n))
    return out.reshape(tuple(shape))


def pin_cpu_kernels(model: nn.Module) -> int:
    """Install the flat dequantization and keep every 4-bit layer off the AVX512-BF16 repacking path; returns how
    many layers changed."""
    install()
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n

