"""random:<shape> bases: built quantized in memory, the same weights on every build, trainable with adapters."""

import bitsandbytes as bnb
import peft
import pytest
import torch

from lightning_qpeft.base_models.tokenizer import load_tokenizer
from lightning_qpeft.model import random_init
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.module import QPeftModule

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(autouse=True)
def tiny_shape(monkeypatch):
    monkeypatch.setitem(random_init.SHAPES, "test-tiny", TINY)


@pytest.mark.parametrize("mode, layer", [("nf4-dq", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt),
                                         ("none", torch.nn.Linear)])
def test_random_model_is_quantized_and_deterministic(mode, layer):
    a = load_base_model("random:test-tiny", mode, compute_dtype="float32", dtype="float32")
    b = load_base_model("random:test-tiny", mode, compute_dtype="float32", dtype="float32")
    assert type(a.model.layers[1].mlp.up_proj) is layer
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        la, lb = a(input_ids=x, labels=x).loss, b(input_ids=x, labels=x).loss
    assert torch.isfinite(la) and la.item() == lb.item()


def test_random_model_trains_with_lora():
    module = QPeftModule("random:test-tiny", quantization="nf4", compute_dtype="float32", dtype="float32",
                         adapter=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    module.configure_model()
    opt = module.configure_optimizers()
    x = torch.randint(0, 512, (4, 16))
    losses = []
    for _ in range(8):
        loss = module(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_random_model_needs_a_tokenizer_and_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="model.tokenizer: random:test-tiny has random weights"):
        load_tokenizer("random:test-tiny")
    with pytest.raises(ValueError, match="model.base_model: unknown random shape 'llama-9b'"):
        load_base_model("random:llama-9b")


def test_cli_links_model_tokenizer_to_data(tiny_model_dir):
    from pathlib import Path

    from lightning_qpeft.cli import QPeftCLI

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    cli = QPeftCLI(args=["--config", str(config), "--model.base_model", "random:llama-2-7b",
                         "--model.tokenizer", tiny_model_dir, "--trainer.logger", "false"], run=False)
    assert cli.datamodule.tokenizer_name == tiny_model_dir
