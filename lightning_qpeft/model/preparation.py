"""Make a loaded base ready for adapter training: frozen, norms in float32, checkpointing as configured.

Config keys (on `QPeftModule`):
    model.gradient_checkpointing: recompute activations in backward (non-reentrant: DDP-safe)
    model.upcast_norms:           keep RMSNorm weights in float32 (QLoRA does). Not free under bf16 autocast: an
                                  fp32 norm weight times a bf16 input is fp32, and bitsandbytes returns its input's
                                  dtype, so q/k/v, the MLP and the residual stream then run in fp32
                                  (tests/model/test_preparation.py); false keeps them bf16
    model.quantized_outputs:      `input` (bitsandbytes: a quantized layer returns its input's dtype, so after a
                                  float32 norm it returns float32) or `autocast` (under autocast it returns the
                                  autocast dtype, as torch's Linear does: a quantized base then runs the
                                  activation dtypes of a 16-bit base with the same norms; `autocast_outputs`)
    model.upcast_embeddings:      also cast the embeddings and the LM head (every weight that is not quantized)
                                  to float32, as prepare_model_for_kbit_training does: off by default; on to
                                  reproduce the peer recipe's numerics (benchmarks/)
    model.compile:                torch.compile the decoder layers (`compile_layers`)
    model.compile_scope:          attention_mlp (two graphs a layer) or decoder_layer (the whole layer, one graph)

This replaces peft's `prepare_model_for_kbit_training`, which (a) turns gradient checkpointing on by default,
so that prefix tuning then refuses to run, and (b) upcasts *every* non-4-bit weight to float32, the 32k x
4096 embedding and LM head included: on Llama-2-7B that is 1 GiB more and an fp32 LM-head matmul (or a cast
per step under autocast). Here both are explicit choices.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lightning_qpeft.core.errors import ConfigError


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


def _is_quantized_linear(module: nn.Module) -> bool:
    # by class name: bitsandbytes need not be importable where no layer is quantized
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and "bitsandbytes" in type(module).__module__


def _to_autocast_dtype(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        device = output.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            if output.dtype != dtype:
                return output.to(dtype)
    return output


def autocast_outputs(model: nn.Module) -> int:
    """Make each bitsandbytes layer return the autocast dtype under autocast, as torch's Linear does; returns how
    many layers. Exact: the layer computes in its compute dtype and casts up to its input's dtype, and this casts
    that back down (a bf16 -> fp32 -> bf16 round trip loses nothing)."""
    n = 0
    for module in model.modules():
        if _is_quantized_linear(module):
            module.register_forward_hook(_to_autocast_dtype)
            n += 1
    return n


def upcast_non_quantized(model: nn.Module) -> int:
    """Cast every float16/bfloat16 parameter that is not a packed 4-bit/8-bit weight to float32, as
    peft's `prepare_model_for_kbit_training` does; returns how many changed."""
    n = 0
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and p.__class__.__name__ not in ("Params4bit", "Int8Params"):
            p.data = p.data.float()
            n += 1
    return n


COMPILE_SCOPES = ("attention_mlp", "decoder_layer")


def check_compile_scope(scope: str) -> None:
    if scope not in COMPILE_SCOPES:
        raise ConfigError("model.compile_scope", f"{scope!r} is not one of {', '.join(COMPILE_SCOPES)}")


def compile_layers(model: nn.Module, options: Optional[dict[str, Any]] = None, scope: str = "attention_mlp") -> int:
    """`torch.compile` every decoder layer's attention and MLP (`scope: attention_mlp`) or the whole layer
    (`decoder_layer`: its norms and residual adds too), in place; returns how many modules were compiled.

    Why inside the layers and not the whole model (whole-model compile trades memory for speed:
    docs/decisions/001-compiled-decoder-layers.md): transformers' gradient checkpointing wraps each decoder
    layer's forward. A compiled region inside that wrapper is an ordinary call to it: whatever the compiled
    graph saves for backward is dropped by the checkpoint and recomputed, so memory stays that of eager
    checkpointing. A graph spanning the checkpoints is partitioned by AOTAutograd instead, which decides on its
    own what to save: the bf16 weights that bitsandbytes dequantizes for the forward matmul are needed again by
    the input-gradient matmul, and a dequantization is not on the partitioner's list of ops cheap to recompute,
    so keeping a bf16 copy of every layer's weights (~12 GiB on Llama-2-7B) is its likely choice (the measured
    memory, and why this is still a hypothesis: docs/decisions/001-compiled-decoder-layers.md).
    Every layer runs the same code, so one compiled graph serves all of them (recompiled per new shape).
    `decoder_layer` makes one graph of each layer instead of two (fewer graph calls, and the norms and residual
    adds no longer run as eager kernels): `compile_decoder_layer` keeps the checkpoint outside that graph.
    """
    from lightning_qpeft.model.fused_loss import causal_lm_of

    check_compile_scope(scope)
    layers = list(getattr(causal_lm_of(model).get_decoder(), "layers", None) or [])
    if scope == "decoder_layer":
        if not layers:
            raise ConfigError("model.compile", f"found no decoder layers in {type(model).__name__}",
                              "set model.compile: false")
        for layer in layers:
            compile_decoder_layer(layer, options)
        return len(layers)
    regions = [getattr(layer, name) for layer in layers for name in ("self_attn", "mlp") if hasattr(layer, name)]
    if not regions:
        raise ConfigError("model.compile", f"found no decoder layers with self_attn/mlp in {type(model).__name__}",
                          "set model.compile: false")
    for region in regions:
        raw = type(region).forward
        region.forward = _eager_with_cache(region, raw, torch.compile(raw, **(options or {})))
    return len(regions)


def compile_decoder_layer(layer: nn.Module, options: Optional[dict[str, Any]] = None) -> None:
    """Compile one decoder layer's own computation, leaving its gradient checkpoint outside the graph.

    `layer.compile()` is not used because where transformers' checkpoint sits depends on its version: up to ~5.17
    `GradientCheckpointingLayer.__call__` checkpoints and then calls `nn.Module.__call__` (a compiled module's
    graph is inside the checkpoint); later versions wrap the class's `forward`, so the checkpoint would be traced
    into the graph. Here the layer's undecorated `forward` is compiled and set on the instance; where
    transformers checkpoints inside `forward` (which the instance attribute now shadows), this forward
    checkpoints itself with the layer's own checkpoint function (non-reentrant, as `enable_gradient_checkpointing`
    set it). Either way each layer is checkpointed once and the checkpoint keeps only its inputs, as in eager.

    Why not trace the checkpoint into the graph (two graph calls a layer and step instead of three, the
    recomputation fused with the backward): inductor's partitioner fails on such a layer with LoRA dropout on
    CUDA (docs/decisions/001-compiled-decoder-layers.md).
    """
    from functools import partial

    forward = type(layer).forward
    hf_attrs = _checkpointing_layer_attrs(layer)
    hf_checkpoints_in_call = "__call__" in hf_attrs
    raw = forward.__wrapped__ if hf_attrs and not hf_checkpoints_in_call and hasattr(forward, "__wrapped__") else forward
    compiled = torch.compile(raw, **(options or {}))

    def checkpointed(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if (not hf_checkpoints_in_call and getattr(module, "gradient_checkpointing", False) and module.training
                and torch.is_grad_enabled()):  # else transformers' __call__ has checkpointed (or no checkpoint)
            return module._gradient_checkpointing_func(partial(compiled, module, **kwargs), *args)
        return compiled(module, *args, **kwargs)

    layer.forward = _eager_with_cache(layer, raw, checkpointed)


# what transformers calls a layer's KV cache, by version and model
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _eager_with_cache(module: nn.Module, raw: Any, compiled: Any) -> Any:
    """`module`'s forward: `compiled`, except when a KV cache is passed (generation), which runs `raw` eagerly.
    Why: the cache is indexed by each layer's own `layer_idx`, a constant Dynamo specialises on, so generation
    would compile every layer apart until the recompile limit (8), then fall back to eager (seen on the CPU with
    the tiny model, tests/model/test_compile.py); training and scoring (MMLU, validation loss) pass no cache and
    keep the compiled graphs."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        if any(kwargs.get(name) is not None for name in CACHE_KWARGS):
            return raw(module, *args, **kwargs)
        return compiled(module, *args, **kwargs)

    return forward


def _checkpointing_layer_attrs(layer: nn.Module) -> dict[str, Any]:
    """The attributes transformers' `GradientCheckpointingLayer` defines itself ({} for other layer classes)."""
    for cls in type(layer).__mro__:
        if cls.__name__ == "GradientCheckpointingLayer":
            return dict(vars(cls))
    return {}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: works with frozen inputs and with DDP (no 'marked ready twice')."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_base(model: nn.Module, gradient_checkpointing: bool, norms_fp32: bool = True,
                 all_fp32: bool = False) -> nn.Module:
    """Freeze the base, upcast its norms (or, `all_fp32`, every weight not quantized), and set checkpointing;
    returns the same model."""
    freeze(model)
    if all_fp32:
        upcast_non_quantized(model)
    elif norms_fp32:
        upcast_norms(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
