"""`model.compile_dequantize`: bitsandbytes' 4-bit dequantization traced into the compiled graphs gives the values
of bitsandbytes' own kernels, leaves no bitsandbytes op in the graphs, and trains as eager does."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import bitsandbytes.functional as F
from lightning_qpeft.model import traced_dequant
from lightning_qpeft.model.module import QPeftModule
from lightning_qpeft.model.bnb_cpu import install
from tests.model.test_compile import fresh_module
from tests.model.test_fused_loss import losses_of

OPS = torch.ops.bitsandbytes
# bitsandbytes' own values: its CPU routine on the flattened weight (model/bnb_cpu.py: its kernel on (rows, cols)
# is wrong on AVX-512 processors where cols are not whole blocks)
install()


@pytest.fixture(autouse=True)
def switched_back():
    """The switch is process-wide: every test leaves it off and AOTAutograd's cache as it found it."""
    cache = torch._functorch.config.enable_autograd_cache
    yield
    traced_dequant.set_traced_dequantize(False)
    assert torch._functorch.config.enable_autograd_cache == cache


@pytest.fixture
def traced():
    traced_dequant.set_traced_dequantize(True)


def decomposed(op):
    from torch._inductor.decomposition import decompositions

    return decompositions[op]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
# 7,680 values: 120 blocks of 64; 33 x 70 = 2,310: 36 blocks and a partial one (and 37 absmax: one partial
# double-quant block of 256)
@pytest.mark.parametrize("shape", [(96, 80), (33, 70)], ids=["whole-blocks", "partial-block"])
def test_traced_dequantization_equals_bitsandbytes_kernels_bit_for_bit(traced, quant_type, nested, dtype, shape):
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=dtype)
    packed, state = F.quantize_4bit(weight, quant_type=quant_type, compress_statistics=nested)
    absmax = state.absmax
    if nested:
        absmax = decomposed(OPS.dequantize_blockwise.default)(state.absmax, state.state2.absmax, state.state2.code,
                                                              state.state2.blocksize, torch.float32) + state.offset
    ours = decomposed(OPS.dequantize_4bit.default)(packed, absmax, state.blocksize, quant_type, state.shape, dtype)
    assert ours.dtype == dtype and torch.equal(ours, F.dequantize_4bit(packed, state))

    x = torch.randn(5, shape[1], dtype=dtype)
    args = (x, packed.view(-1, 1), state.shape, state.state2.absmax if nested else state.absmax, state.blocksize,
            quant_type, None, *((state.absmax, state.state2.code, state.offset) if nested else (None,) * 3))
    assert torch.equal(decomposed(OPS.gemm_4bit.default)(*args), OPS.gemm_4bit.default(*args))


def test_inductor_compiles_the_op_traced_when_on_and_opaque_when_off_again():
    """Inductor itself (C++ on the CPU): with the switch on its code has no bitsandbytes call; switched off after
    that, the op compiles as an opaque call again (inductor refuses an op that has a decomposition as a call)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    packed, state = F.quantize_4bit(torch.randn(64, 32), quant_type="nf4", compress_statistics=True)
    x = torch.randn(3, 32)

    def linear(x):
        return torch.nn.functional.linear(x, F.dequantize_4bit(packed, state))

    eager = linear(x)
    for on in (True, False, True):
        traced_dequant.set_traced_dequantize(on)
        if on:
            assert not torch._functorch.config.enable_autograd_cache
        torch._dynamo.reset()
        out, code = run_and_get_code(torch.compile(linear, backend="inductor"), x)
        assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
        assert ("torch.ops.bitsandbytes." in "\n".join(code)) is not on  # a call (comments name the source op)


def recording_backend(graphs):
    """AOTAutograd with inductor's decomposition table (what inductor traces with), running the graphs eagerly and
    keeping their code."""
    from torch._inductor.compile_fx import select_decomp_table

    def keep(gm, _inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep, decompositions=select_decomp_table)


@pytest.mark.parametrize("traced_on", [False, True], ids=["opaque", "traced"])
def test_compiled_layers_trace_the_dequantization_and_train_as_eager(tiny_model_dir, batches, traced_on):
    plain, _ = losses_of(tiny_model_dir, batches, steps=3, gradient_checkpointing=True)
    graphs = []
    module = fresh_module(tiny_model_dir, gradient_checkpointing=True, compile=True, compile_scope="decoder_layer",
                          compile_dequantize=traced_on, compile_options={"backend": recording_backend(graphs)})
    if traced_on:  # a graph from AOTAutograd's cache could be the other kind
        assert not torch._functorch.config.enable_autograd_cache
    compiled, _ = losses_of(tiny_model_dir, batches, steps=3, module=module)
    assert compiled == pytest.approx(plain, rel=1e-5) and plain[1] != pytest.approx(plain[0], rel=1e-3)
    code = "\n".join(graphs)
    assert len(graphs) >= 2  # a forward and a backward graph
    # the forward's fused dequantize + matmul and the input gradient's dequantization
    assert ("torch.ops.bitsandbytes." in code) is not traced_on
    if traced_on:  # the nibble lookup of bitsandbytes' plain-torch kernel, in place of its ops
        assert "aten.bitwise_and" in code and "aten.__rshift__" in code


def test_compile_dequantize_without_compile_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="model.compile_dequantize: true .* needs model.compile: true"):
        QPeftModule(tiny_model_dir, compile_dequantize=True)
