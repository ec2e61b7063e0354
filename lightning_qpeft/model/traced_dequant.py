"""bitsandbytes' 4-bit dequantization traced into torch.compile's graphs (`model.compile_dequantize`).

bitsandbytes exposes its CUDA kernels as torch.library ops whose kernels are Python functions (argument checks,
buffer allocation, a ctypes call). A compiled decoder layer calls them as opaque ops, one Python dispatch each:
every 4-bit weight is dequantized three times a step, in four ops (the forward and the checkpoint's
recomputation call `gemm_4bit`, dequantization + matmul in one op; the input gradient calls
`dequantize_blockwise` for the double-quantized absmax, then `dequantize_4bit`): four Python dispatches per
adapted weight and step, ~900 on Llama-2-7B's 224 (what that costs: docs/decisions/002-traced-dequantization.md).

The arithmetic is small: a code-table lookup of each nibble (high one first), times its block's fp32 absmax,
cast to the compute dtype; with double quantization the absmax is first looked up in an 8-bit table and scaled
per block of 256, plus an offset. Written here in torch ops (why by hand: bitsandbytes' own plain-torch
kernels, its `default` backend, fill slices in place, which AOTAutograd cannot trace inside a decomposition)
and registered as inductor decompositions of `dequantize_4bit`, `dequantize_blockwise` and `gemm_4bit`
(dequantize + linear), so the compiled graphs contain it instead of the opaque ops; inductor fuses each
weight's two dequantizations into its generated kernels, launched from its wrapper code without Python
dispatch. The values are bitsandbytes' own (tests/model/test_traced_dequant.py: bit-identical to its kernels on
the CPU, NF4 and FP4, with and without double quantization, bf16/fp16/fp32; its CUDA kernels compute the same
fp32 product and cast, so on a GPU training with it is the same within bf16 rounding:
docs/decisions/002-traced-dequantization.md). For a micro-batch of at most
1,536 rows bitsandbytes' CUDA `gemm_4bit` runs its own fused 4-bit GEMM, which this
replaces by dequantization + cuBLAS: same values up to the matmul's summation order.

Only what torch.compile traces changes: eager calls keep bitsandbytes' kernels. Inductor has one decomposition
table per process: `set_traced_dequantize` puts these three in it or takes them out (the last module configured
decides). Out is out: inductor refuses to compile an op that has a decomposition as an opaque call ("both a
fallback and a decomp for same op"), so a declining decomposition would not do.
"""

from __future__ import annotations

from math import prod
from typing import Any, Callable, Optional

import torch

_ours: dict[Any, Callable[..., Any]] = {}  # op -> its decomposition, built on first use
_autograd_cache: Any = None  # AOTAutograd cache's setting before the traced dequantization turned it off


def set_traced_dequantize(enabled: bool) -> None:
    """Trace the dequantization into graphs compiled from now on (`enabled`), or leave bitsandbytes' ops opaque.
    Raises ImportError naming what this bitsandbytes or torch lacks.

    While enabled, AOTAutograd's on-disk cache is off: its key is the graph Dynamo captured (the same either
    way) and the configs, not the decomposition table, so a later run would be served a graph compiled under
    the other setting. Inductor's own cache stays on (its key is the decomposed graph)."""
    global _autograd_cache
    if not enabled and not _ours:
        return  # never on in this process: nothing to take out (and inductor need not be imported)
    from torch._functorch import config as functorch_config

    try:
        from torch._inductor import decomposition as inductor_decompositions

        table, cached_table = inductor_decompositions.decompositions, inductor_decompositions.fast_random_decomps
    except (ImportError, AttributeError) as e:
        raise ImportError(f"model.compile_dequantize: this torch has no inductor decomposition table ({e}); set "
                          "model.compile_dequantize: false") from e
    if enabled:
        table.update(_decompositions())
        if _autograd_cache is None:
            _autograd_cache = functorch_config.enable_autograd_cache
        functorch_config.enable_autograd_cache = False
    else:
        for op, fn in _ours.items():
            if table.get(op) is fn:  # ours only
                del table[op]
        if _autograd_cache is not None:
            functorch_config.enable_autograd_cache = _autograd_cache
            _autograd_cache = None
    # inductor reads the table through a cached copy (with its random-op decompositions): made again next compile
    cached_table.cache_clear()


def _decompositions() -> dict[Any, Callable[..., Any]]:
    if _ours:
        return _ours
    try:
        from bitsandbytes.functional import get_4bit_type

        ops = torch.ops.bitsandbytes
        targets = (ops.dequantize_4bit.default, ops.dequantize_blockwise.default, ops.gemm_4bit.default)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"model.compile_dequantize: this bitsandbytes does not have the 4-bit ops it traces "
                          f"({e}); set model.compile_dequantize: false") from e
    # the 16-value code tables as Python floats (exact: fp32 values), made into a tensor inside each trace: a real
    # tensor cannot enter the fake-tensor trace, and bitsandbytes' own per-device cache must not get a fake one
    codes = {name: get_4bit_type(name, device="cpu").tolist() for name in ("nf4", "fp4")}

    def dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Any,
                        dtype: torch.dtype) -> torch.Tensor:
        return _dequantize_4bit(A, absmax, blocksize, shape, dtype, codes[quant_type])

    def dequantize_blockwise(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                             dtype: torch.dtype) -> torch.Tensor:
        return _scaled(code[A.reshape(-1).long()], absmax, blocksize).to(dtype).reshape(A.shape)

    def gemm_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: Any, absmax: torch.Tensor, blocksize: int,
                  quant_type: str, bias: Optional[torch.Tensor] = None, absmax_8bit: Optional[torch.Tensor] = None,
                  absmax_code: Optional[torch.Tensor] = None,
                  absmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        if absmax_8bit is not None:  # double quantization: the blocks' absmax is itself 8-bit, in blocks of 256
            absmax = dequantize_blockwise(absmax_8bit, absmax, absmax_code, 256, torch.float32) + absmax_offset
        weight = dequantize_4bit(B, absmax, blocksize, quant_type, shapeB, A.dtype)
        return torch.nn.functional.linear(A, weight, bias)

    _ours.update(zip(targets, (dequantize_4bit, dequantize_blockwise, gemm_4bit)))
    return _ours


def _dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: Any, dtype: torch.dtype,
                     code_values: list[float]) -> torch.Tensor:
    packed = (A if A.dtype == torch.uint8 else A.view(torch.uint8)).reshape(-1)  # FSDP's float storage
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[: prod(shape)]  # high one first
    code = torch.tensor(code_values, dtype=torch.float32, device=A.device)
    return _scaled(code[nibbles.long()], absmax, blocksize).to(dtype).reshape(shape)


def dequantize_4bit_torch(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Any,
                          dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization in eager torch ops (its semantics: blocks over the flattened weight)."""
    from bitsandbytes.functional import get_4bit_type

    return _dequantize_4bit(A, absmax, blocksize, shape, dtype, get_4bit_type(quant_type, device="cpu").tolist())


def _scaled(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Each block of `blocksize` fp32 values times its block's absmax, in fp32 (as bitsandbytes' kernels: one
    multiplication, then the cast). A last partial block is padded for the product and cut after."""
    n = values.numel()
    padded = torch.nn.functional.pad(values, (0, absmax.numel() * blocksize - n))
    return (padded.view(-1, blocksize) * absmax.view(-1, 1)).reshape(-1)[:n]
