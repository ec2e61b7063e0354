"""build_model carries out the plan: the storage dtype, the norm upcast, the adapter, and nothing the plan did
not decide (the tiny model on the CPU)."""

import torch
from peft import LoraConfig

from lightning_qpeft.model.build import build_model
from lightning_qpeft.model.facts import RunConfig, TrainerFacts
from lightning_qpeft.model.plan import resolve_plan

LORA = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def norm_dtypes(model):
    return {p.dtype for n, p in model.named_parameters() if "norm" in n}


def test_the_built_model_is_the_one_the_plan_describes(tiny_model_dir):
    config = RunConfig(adapter=LORA, quantization="nf4", compute_dtype="bfloat16")
    plan = resolve_plan(config, TrainerFacts(strategy="single", precision="bf16-mixed", device="cpu"))
    model = build_model(plan, tiny_model_dir, LORA, torch.device("cpu"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert norm_dtypes(model) == {torch.float32}  # the plan upcasts norms
    packed = {p.dtype for n, p in model.named_parameters() if "q_proj.base_layer" in n}
    assert packed == {torch.uint8}  # the plan's storage dtype
    # the same configuration under FSDP: norms stay in the weights' dtype (one dtype a flat parameter), and 4-bit
    # weights are stored as the precision's float dtype
    fsdp = resolve_plan(config, TrainerFacts(strategy="fsdp", precision="bf16-mixed", device="cpu"))
    assert (fsdp.quant_storage, fsdp.upcast_norms) == ("bfloat16", False)
    model = build_model(fsdp, tiny_model_dir, LORA, torch.device("cpu"))  # LoRA's units flatten: no refusal
    assert norm_dtypes(model) == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if "q_proj.base_layer" in n} == {torch.bfloat16}
