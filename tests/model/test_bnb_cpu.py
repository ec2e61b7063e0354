"""bitsandbytes on the CPU: the installed dequantization is blockwise over the flattened weight for every shape
(its native kernel on (rows, cols) was wrong on AVX-512 processors where cols are not whole blocks), the 4-bit
matmul uses it, and layers never take the AVX512-BF16 repacking path."""

import bitsandbytes.functional as F
import pytest
import torch

from lightning_qpeft.model.bnb_cpu import install, pin_cpu_kernels
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.traced_dequant import dequantize_4bit_torch


@pytest.mark.parametrize("shape", [(96, 80), (64, 176), (176, 64), (33, 70), (7, 5)], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantization_is_blockwise_over_the_flattened_weight(shape, quant_type, dtype):
    install()
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=dtype)
    packed, state = F.quantize_4bit(weight, quant_type=quant_type)
    expected = dequantize_4bit_torch(packed, state.absmax, state.blocksize, quant_type, state.shape, dtype)
    assert torch.equal(F.dequantize_4bit(packed, state), expected)
    # by hand, for the first and last values: code[nibble] x absmax of the block the flat index falls in
    code = F.get_4bit_type(quant_type, device="cpu")
    flat = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], -1).view(-1)[: weight.numel()]
    for i in (0, weight.numel() - 1):
        by_hand = (code[flat[i].long()] * state.absmax[i // state.blocksize]).to(dtype)
        assert expected.view(-1)[i] == by_hand


def test_the_4bit_matmul_uses_it():
    install()
    torch.manual_seed(0)
    weight = torch.randn(64, 176)
    packed, state = F.quantize_4bit(weight, quant_type="nf4")
    x = torch.randn(3, 176)
    import bitsandbytes as bnb

    expected = torch.nn.functional.linear(x, dequantize_4bit_torch(packed, state.absmax, 64, "nf4", state.shape,
                                                                   torch.float32))
    torch.testing.assert_close(bnb.matmul_4bit(x, packed.t(), state), expected, rtol=1e-6, atol=1e-6)


def test_loaded_4bit_layers_never_repack_for_avx512bf16(tiny_model_dir):
    model = load_base_model(tiny_model_dir, "nf4", compute_dtype="float32")
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert pin_cpu_kernels(model) == 0  # already pinned by the loader
