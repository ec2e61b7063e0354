"""Make a loaded base ready for adapter training: frozen, norms in float32, checkpointing as configured.

Config keys (on `QPeftModule`):
    model.gradient_checkpointing: recompute activations in backward (non-reentrant: DDP-safe)
    model.upcast_norms:           keep RMSNorm weights in float32 (QLoRA does; costs nothing measurable)

This replaces peft's `prepare_model_for_kbit_training`, which (a) turns gradient checkpointing on by default,
so that prefix tuning then refuses to run, and (b) upcasts *every* non-4-bit weight to float32, the 32k x
4096 embedding and LM head included: on Llama-2-7B that is 1 GiB more and an fp32 LM-head matmul (or a cast
per step under autocast). Here both are explicit choices.
"""

from __future__ import annotations

import torch
from torch import nn


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def upcast_norms(model: nn.Module) -> int:
    """Cast normalisation layers' weights to float32; returns how many modules changed."""
    n = 0
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() or name.endswith("norm"):
            for p in module.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
                    n += 1
    return n


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: works with frozen inputs and with DDP (no 'marked ready twice')."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_base(model: nn.Module, gradient_checkpointing: bool, norms_fp32: bool = True) -> nn.Module:
    """Freeze the base, upcast its norms, and set checkpointing; returns the same model."""
    freeze(model)
    if norms_fp32:
        upcast_norms(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
