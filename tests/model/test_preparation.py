"""What the fp32 upcasts do to activations under bf16 autocast (why model.upcast_norms is a speed knob)."""

import peft
import pytest
import torch

from lightning_qpeft.model.module import QPeftModule

LORA = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


@pytest.mark.parametrize("upcast_norms, outputs, activations", [(True, "input", torch.float32),
                                                               (False, "input", torch.bfloat16),
                                                               (True, "autocast", torch.bfloat16)])
def test_fp32_norm_weights_make_the_activations_fp32(tiny_model_dir, upcast_norms, outputs, activations):
    module = QPeftModule(tiny_model_dir, quantization="nf4", compute_dtype="bfloat16", adapter=LORA,
                         upcast_norms=upcast_norms, quantized_outputs=outputs)
    module.configure_model()
    layer = module.model.get_base_model().model.layers[1]
    seen = {}
    for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
        layer.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, out.dtype))
    layer.register_forward_hook(lambda mod, args, out: seen.__setitem__("residual", out.dtype))
    ids = torch.randint(0, 200, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(input_ids=ids)
    # an fp32 RMSNorm weight times a bf16 input promotes to fp32; bitsandbytes casts its output back to its
    # input's dtype, so q/k/v, the MLP and then the residual stream all run in fp32 (model.quantized_outputs:
    # input); with autocast outputs they run in bf16 behind fp32 norms, as a 16-bit base's do
    assert set(seen.values()) == {activations}, seen


def test_an_unknown_quantized_outputs_is_refused_before_loading(tiny_model_dir):
    with pytest.raises(ValueError, match="model.quantized_outputs: 'bf16'; choose input or autocast"):
        QPeftModule(tiny_model_dir, quantized_outputs="bf16")


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_autocast_outputs_give_a_quantized_base_the_activations_of_a_16bit_one(tiny_model_dir, quantization):
    from lightning_qpeft.model.loading import load_base_model
    from lightning_qpeft.model.preparation import autocast_outputs, prepare_base

    ids = torch.randint(0, 200, (2, 12))
    layers, logits = {}, {}
    for mode in ("input", "autocast"):
        base = prepare_base(load_base_model(tiny_model_dir, quantization, compute_dtype="bfloat16"), False)
        if mode == "autocast":
            assert autocast_outputs(base) == 7 * base.config.num_hidden_layers
        seen = {}
        mlp = base.model.layers[1].mlp
        for name in ("up_proj", "down_proj"):
            mlp.get_submodule(name).register_forward_hook(
                lambda m, a, out, name=name: seen.__setitem__(name, out.dtype))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits[mode] = base(input_ids=ids).logits.float()
        layers[mode] = seen
    assert layers["input"]["up_proj"] == torch.float32  # after an fp32 norm, bitsandbytes returns fp32
    assert set(layers["autocast"].values()) == {torch.bfloat16}  # as torch's Linear under autocast
    # the same matmuls; only what follows them (activation, product, residual adds) rounds to bf16: on the random
    # tiny model that moves the logits by ~2 % of their mean size (int8), well under a broken cast's
    diff = (logits["autocast"] - logits["input"]).abs()
    assert diff.mean() < 0.05 * logits["input"].abs().mean() and diff.max() < 0.5, (diff.mean(), diff.max())
    outside = torch.nn.Linear(4, 4)
    assert autocast_outputs(outside) == 0  # nothing but bitsandbytes layers
