"""`build_model(plan, ...)`: the model a run plan describes, built on this rank.

    load the base (quantized per the plan, on this rank's device or first in CPU memory under FSDP)
    -> prepare it (gradient checkpointing, norm and embedding upcast) -> attach the adapter
    -> check what only the built model shows (FSDP units, the LM head the fused loss needs) -> compile

Every decision comes from the plan (`plan.py`); this module only carries it out, so what a run builds can be
read off its plan before any weight loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_qpeft.base_models.folders import resolve_base_model
from lightning_qpeft.distributed import check_flattenable
from lightning_qpeft.model.adapters import attach_adapter
from lightning_qpeft.model.fused_loss import causal_lm_of, output_layer
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.plan import RunPlan
from lightning_qpeft.model.preparation import autocast_outputs, compile_layers, prepare_base
from lightning_qpeft.model.traced_dequant import set_traced_dequantize


def build_model(
    plan: RunPlan,
    base_model: str,
    adapter: Any,
    device: torch.device,
    attn_implementation: Optional[str] = "sdpa",
    trust_remote_code: bool = False,
    compile_options: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """The base `base_model` with `adapter` (or the trained one at the plan's `adapter_path`), as `plan` says.

    Args:
        plan: the resolved run plan.
        base_model: `model.base_model` (hub id, folder, .gguf file or random:<shape>).
        adapter: the adapter config to attach (the plan's, with the run's step count where the method needs it).
        device: this rank's device; 4-bit weights are quantized there even when the base is built in CPU memory.
        attn_implementation, trust_remote_code, compile_options: the `model.*` keys of the same names.
    """
    config = plan.config
    base = load_base_model(
        base_model,
        quantization=config.quantization,
        compute_dtype=config.compute_dtype,
        dtype=config.dtype,
        quant_storage=plan.quant_storage,
        device=torch.device("cpu") if plan.load_on_cpu else device,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        quantize_device=device,
    )
    base = prepare_base(base, config.gradient_checkpointing, plan.upcast_norms, plan.upcast_embeddings)
    if config.quantized_outputs == "autocast":
        autocast_outputs(base)
    path = resolve_base_model(base_model)
    base_path = path if Path(path).is_dir() else None  # LoftQ reads the unquantized weights from here
    model = attach_adapter(base, adapter, config.adapter_path, base_path=base_path)
    if plan.check_flattenable:  # what the rules cannot know of a method without a row
        check_flattenable(model, plan.method)
    if plan.loss != "standard":
        output_layer(causal_lm_of(model), config.loss)  # refuse a head the fused loss would get wrong
    # process-wide (inductor's decomposition table): set by every build, so none inherits another's
    set_traced_dequantize(plan.compile_dequantize)
    if plan.compile:
        n = compile_layers(model, compile_options, config.compile_scope)
        what = "attention and MLP modules" if config.compile_scope == "attention_mlp" else "decoder layers"
        rank_zero_info(f"model.compile: {n} {what} compiled (options {compile_options or {}}"
                       + ("; 4-bit dequantization traced" if plan.compile_dequantize else "") + ")")
    return model
