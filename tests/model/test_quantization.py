import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.quantization import QUANT_MODES, bnb_config

LAYER_TYPES = {"none": nn.Linear, "nf4": bnb.nn.Linear4bit, "nf4-dq": bnb.nn.Linear4bit,
               "fp4": bnb.nn.Linear4bit, "fp4-dq": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def test_every_mode_has_an_expected_layer_type():
    assert set(LAYER_TYPES) == set(QUANT_MODES)


@pytest.mark.parametrize("mode", list(QUANT_MODES))
def test_linear_layers_are_the_modes_bnb_layers(tiny_model_dir, mode):
    model = load_base_model(tiny_model_dir, mode, compute_dtype="float32")
    proj = model.model.layers[0].self_attn.q_proj
    assert type(proj) is LAYER_TYPES[mode]
    assert type(model.model.layers[1].mlp.down_proj) is LAYER_TYPES[mode]
    assert type(model.lm_head) is nn.Linear  # bnb (like QLoRA) keeps the head unquantized
    if mode.startswith(("nf4", "fp4")):
        assert proj.weight.quant_state.quant_type == mode[:3]
        assert (proj.weight.quant_state.state2 is not None) == mode.endswith("-dq")


def test_bnb_config_maps_modes():
    assert bnb_config("none") is None
    c = bnb_config("nf4-dq", compute_dtype="bfloat16")
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant
    assert c.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config("int8").load_in_8bit
    assert bnb_config("fp4", quant_storage="bfloat16").bnb_4bit_quant_storage == torch.bfloat16


def test_unknown_mode_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"model.quantization: unknown mode 'nf3'"):
        bnb_config("nf3")
