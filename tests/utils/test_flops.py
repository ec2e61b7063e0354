"""The FLOP count against hand computations, and the device peak table."""

import pytest
import torch
from transformers import LlamaConfig

from lightning_qpeft.utils.flops import TransformerShape, lookup_peak, peak_flops, training_flops

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32)


def test_llama2_7b_matmul_parameters_by_hand():
    shape = TransformerShape.from_config(LLAMA2_7B)
    # per layer: q, k, v, o 4096x4096 each + gate, up, down 4096x11008 each
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert shape.layer_matmul_params == per_layer == 202_375_168
    assert shape.matmul_params == 32 * per_layer + 4096 * 32000 == 6_607_077_376  # peers.md: 6.6e9


def test_grouped_query_attention_counts_smaller_kv_projections():
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    shape = TransformerShape.from_config(config)
    assert (shape.head_dim, shape.kv_heads) == (16, 2)
    # q 64x64, k and v 64x32, o 64x64, MLP 3 x 64x176; head 64x100
    assert shape.matmul_params == 2 * (4096 + 2 * 2048 + 4096 + 3 * 64 * 176) + 6400


def test_training_flops_by_hand():
    shape = TransformerShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, head_dim=4, vocab=10)
    n = shape.matmul_params  # 2 * (4*64 + 3*128) + 80 = 1360
    assert n == 1360
    tokens, pairs, lora = 10, 31, 100  # e.g. records of 4 and 6 tokens: 4*5/2 + 6*7/2 = 31 causal pairs
    attention = 4 * 2 * 2 * 4 * pairs  # 4 * L * nh * d * pairs
    f = training_flops(shape, tokens, pairs, lora)
    assert f.model == tokens * (4 * n + 6 * lora) + 3 * attention
    assert f.hardware == f.model
    g = training_flops(shape, tokens, pairs, lora, recompute=True)
    body = 2 * (4 * 64 + 3 * 128)
    assert g.model == f.model
    assert g.hardware == f.model + tokens * 2 * (body + lora) + attention
    # full fine-tuning: every matmul weight trains (6 per token), nothing frozen
    full = training_flops(shape, tokens, pairs, n, frozen_matmul_params=0)
    assert full.model == tokens * 6 * n + 3 * attention


def test_missing_config_fields_are_refused():
    with pytest.raises(ValueError, match="intermediate_size"):
        TransformerShape.from_config(type("Cfg", (), dict(hidden_size=8, num_hidden_layers=1,
                                                          num_attention_heads=1, vocab_size=3))())


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 790e12),  # measured here, not the datasheet's 989.4e12
    ("NVIDIA H200 NVL", 835.5e12),
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756.5e12),
    ("NVIDIA GH200 480GB", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362.05e12),
])
def test_device_table_knows_the_gpus(name, peak):
    assert lookup_peak(name).half == peak


def test_unknown_device_and_cpu_have_no_peak():
    assert lookup_peak("NVIDIA GeForce GTX 1080") is None
    assert peak_flops(torch.device("cpu"), "bf16-mixed") == (None, "none (not a CUDA device)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_this_gpu_has_a_peak():
    peak, source = peak_flops(torch.device("cuda", 0), "bf16-mixed")
    assert peak is not None, source
