"""The run plan: every decision derived from the configuration and the trainer's facts, resolved in one place.

    resolve_plan(RunConfig, TrainerFacts) -> RunPlan        or raises ConfigError (key, reason, way out)

A pure function: no weight loads, no trainer or device is touched, the same inputs give the same plan. It checks
each key's value (`quantization`, `compute_dtype`, `loss`, ...), runs the refusal table (`rules.RULES`, which
reads the method's row in `compat.METHODS`) and returns what the rest of the run follows: the storage dtype of
4-bit weights, whether norms are upcast, which loss implementation runs, whether layers compile, where the base
is built, what runs after each optimizer step. `QPeftModule` resolves it once the trainer is known (`setup`);
the study's precheck calls the same function for each cell.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.model.compat import Method, lookup
from lightning_qpeft.model.facts import RunConfig, TrainerFacts
from lightning_qpeft.model.fused_loss import check_loss_name, loss_implementation
from lightning_qpeft.model.preparation import check_compile_scope
from lightning_qpeft.model.quantization import get_quant_mode, resolve_dtype
from lightning_qpeft.model.rules import Setting, first_refusal, fsdp_param_dtype_name

QUANTIZED_OUTPUTS = ("input", "autocast")  # preparation.autocast_outputs
FSDP_LOAD_ON = ("cpu", "device")


@dataclass(frozen=True)
class RunPlan:
    """What the run does, decided before any weight loads.

    Attributes:
        config, facts: what it was resolved from.
        method: the adapter's name in the compatibility table (`none`: a bare base).
        row: its row (None: a bare base, or a method without a row).
        strategy: single, ddp or fsdp (None: not known yet).
        quant_storage: the storage dtype of packed 4-bit weights (uint8; under FSDP the precision's 16-bit dtype,
            which FSDP needs to shard them).
        upcast_norms: norm weights in float32 (never under FSDP: a flat parameter has one dtype).
        upcast_embeddings: embeddings and LM head in float32 too.
        loss: the loss implementation that runs: standard, chunked or liger (`fused` resolved for the device).
        compile: whether decoder layers are compiled (not under FSDP: compiled layers inside FSDP units are
            untested here).
        compile_dequantize: whether 4-bit dequantization is traced into the compiled graphs.
        load_on_cpu: whether the base is built in CPU memory first (FSDP moves one unit at a time to the GPU).
        check_flattenable: whether the built model is checked for units FSDP cannot flatten (under FSDP).
        clip_with_fsdp: whether gradients are clipped by FSDP's own clip_grad_norm_ (Lightning's FSDP precision
            refuses norm clipping).
        total_steps: the row's `total_steps` when this run must lay the method's schedule over its optimizer steps.
        after_step: the row's `after_step` when this run trains a new adapter of that method.
        checkpoint_holds: what a checkpoint keeps: the trainable tensors (the base is reloaded, never saved).
        warnings: what the run should say before it starts (each once).
    """

    config: RunConfig
    facts: TrainerFacts
    method: str
    row: Optional[Method]
    strategy: Optional[str]
    quant_storage: str
    upcast_norms: bool
    upcast_embeddings: bool
    loss: str
    compile: bool
    compile_dequantize: bool
    load_on_cpu: bool
    check_flattenable: bool
    clip_with_fsdp: bool
    total_steps: Optional[Callable[[Any, int], Any]] = None
    after_step: Optional[Callable[[Any, int], None]] = None
    checkpoint_holds: str = "trainable tensors"
    warnings: tuple[str, ...] = ()


def check_values(config: RunConfig) -> None:
    """Refuse a value no run can have (an unknown quantization mode, dtype, loss, compile scope, ...)."""
    get_quant_mode(config.quantization)
    check_loss_name(config.loss)
    resolve_dtype(config.compute_dtype, "model.compute_dtype")
    if config.dtype != "auto":
        resolve_dtype(config.dtype, "model.dtype")
    check_compile_scope(config.compile_scope)
    if config.fsdp_load_on not in FSDP_LOAD_ON:
        raise ConfigError("model.fsdp_load_on", f"{config.fsdp_load_on!r}", "choose cpu or device")
    if config.quantized_outputs not in QUANTIZED_OUTPUTS:
        raise ConfigError("model.quantized_outputs", f"{config.quantized_outputs!r}", "choose input or autocast")


def resolve_plan(config: RunConfig, facts: Optional[TrainerFacts] = None) -> RunPlan:
    """The plan of a run with this configuration on this trainer (facts unknown: the configuration's own refusals
    only); raises the first `ConfigError` of the refusal table."""
    facts = facts or TrainerFacts()
    check_values(config)
    setting = setting_of(config, facts)
    refusal = first_refusal(setting)
    if refusal is not None:
        raise refusal
    name, row, storage, upcast_norms = setting.name, setting.method, setting.quant_storage, setting.upcast_norms
    mode = get_quant_mode(config.quantization)
    fsdp = setting.fsdp

    warnings: list[str] = []
    if config.adapter is not None and row is None:
        warnings.append(f"model.adapter={name} is not in the compatibility table (lightning_qpeft/model/compat.py): "
                        "unverified on this project")
    if mode.is_4bit and (config.compute_dtype == "float16" or facts.precision.startswith("16")):
        warnings.append("model.compute_dtype=float16 / trainer.precision=16-* with a 4-bit base is a known source of "
                        "loss collapse (fp16 overflows in the dequantized matmuls); prefer bfloat16 and bf16-mixed on "
                        "GPUs that have it (Ampere and newer)")
    compiles = config.compile and not fsdp
    if config.compile and fsdp:
        warnings.append("model.compile: not applied under trainer.strategy=fsdp (compiled layers inside FSDP units are "
                        "untested here); this run is eager")
    new_adapter = not config.adapter_from_path
    return RunPlan(
        config=config,
        facts=facts,
        method=name,
        row=row,
        strategy=facts.strategy,
        quant_storage=storage,
        upcast_norms=upcast_norms,
        upcast_embeddings=config.upcast_embeddings,
        loss=loss_implementation(config.loss, facts.device),
        compile=compiles,
        compile_dequantize=compiles and config.compile_dequantize,
        load_on_cpu=fsdp and config.fsdp_load_on == "cpu" and facts.device not in (None, "cpu"),
        check_flattenable=fsdp,
        clip_with_fsdp=fsdp,
        total_steps=row.total_steps if row is not None and new_adapter and facts.fitting else None,
        after_step=row.after_step if row is not None and new_adapter else None,
        checkpoint_holds="every weight" if name == "full" else "trainable tensors",
        warnings=tuple(warnings),
    )


def setting_of(config: RunConfig, facts: TrainerFacts) -> Setting:
    """What the rules see: the method's row, and the storage dtype and norm upcast this strategy gets."""
    name, row = lookup(config.adapter)
    if facts.strategy == "fsdp":  # FSDP shards float tensors of one dtype a unit
        is_4bit = get_quant_mode(config.quantization).is_4bit
        storage = (fsdp_param_dtype_name(facts.precision) or "float32") if is_4bit else "uint8"
        return Setting(config, facts, name, row, storage, False)
    storage = "uint8" if config.quant_storage == "auto" else config.quant_storage
    return Setting(config, facts, name, row, storage, config.upcast_norms)


def with_data(config: RunConfig, datamodule: Any) -> RunConfig:
    """The configuration with the data module's `packing` and `pad_to_multiple_of` (unchanged without one)."""
    if datamodule is None:
        return config
    packing, pad = getattr(datamodule, "packing", False), getattr(datamodule, "pad_to_multiple_of", None)
    return dataclasses.replace(config, packing=packing is True,
                               pad_to_multiple_of=pad if isinstance(pad, int) else None)


__all__ = ["ConfigError", "RunConfig", "RunPlan", "TrainerFacts", "check_values", "resolve_plan", "setting_of",
           "with_data"]
