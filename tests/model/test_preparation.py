"""What the fp32 upcasts do to activations under bf16 autocast (why model.upcast_norms is a speed knob)."""

import peft
import pytest
import torch

from lightning_qpeft.model.module import QPeftModule

LORA = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


@pytest.mark.parametrize("upcast_norms, activations", [(True, torch.float32), (False, torch.bfloat16)])
def test_fp32_norm_weights_make_the_activations_fp32(tiny_model_dir, upcast_norms, activations):
    module = QPeftModule(tiny_model_dir, quantization="nf4", compute_dtype="bfloat16", adapter=LORA,
                         upcast_norms=upcast_norms)
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
    # input's dtype, so q/k/v, the MLP and then the residual stream all run in fp32
    assert set(seen.values()) == {activations}, seen
