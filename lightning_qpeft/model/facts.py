"""What a run plan is decided from: the configuration (`RunConfig`) and the trainer's facts (`TrainerFacts`).

Both are plain frozen records, so the plan (`plan.resolve_plan`) is a function of values: the same records give
the same plan, with no model, trainer or device touched. `trainer_facts` reads them off a Lightning trainer;
`optimizer_steps` is the one fact known only once the data is (the run's length, for schedules laid over it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lightning_qpeft.core.errors import ConfigError

STRATEGIES = ("single", "ddp", "fsdp")


@dataclass(frozen=True)
class RunConfig:
    """The `model.*` (and two `data.*`) keys the plan decides from; the names are the config keys'.

    `adapter` is the adapter config in use: the one given, or the one read from `adapter_path`
    (`adapter_from_path`).
    """

    adapter: Any = None
    adapter_path: Optional[str] = None
    adapter_from_path: bool = False
    quantization: str = "nf4-dq"
    compute_dtype: str = "bfloat16"
    dtype: str = "auto"
    quant_storage: str = "auto"
    gradient_checkpointing: bool = False
    upcast_norms: bool = True
    upcast_embeddings: bool = False
    quantized_outputs: str = "input"
    loss: str = "standard"
    compile: bool = False
    compile_scope: str = "attention_mlp"
    compile_dequantize: bool = False
    fsdp_load_on: str = "cpu"
    packing: bool = False  # data.packing
    pad_to_multiple_of: Optional[int] = None  # data.pad_to_multiple_of


@dataclass(frozen=True)
class TrainerFacts:
    """What the trainer decides: None (or "") where not known yet (a module built before its trainer).

    Rules that need a fact pass while it is unknown; `QPeftModule.setup` resolves the plan again once it is.
    """

    strategy: Optional[str] = None  # single | ddp | fsdp
    precision: str = ""  # trainer.precision
    device: Optional[str] = None  # the root device's type: cpu, cuda, ...
    world_size: int = 1
    fitting: Optional[bool] = None
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Optional[str] = None  # norm | value (None: norm)


def _str(value: Any) -> Optional[str]:
    value = getattr(value, "value", value)  # Lightning's string enums
    return value if isinstance(value, str) else None


def trainer_facts(trainer: Any, fitting: Optional[bool] = None) -> TrainerFacts:
    """The facts of a Lightning trainer (`fitting`: whether the run trains; default: the trainer's state)."""
    if trainer is None:
        return TrainerFacts(strategy="single", device="cpu", fitting=bool(fitting))
    strategy = trainer.strategy
    kind = "fsdp" if isinstance(strategy, FSDPStrategy) else "ddp" if isinstance(strategy, DDPStrategy) else "single"
    world_size = getattr(trainer, "world_size", 1)
    clip = getattr(trainer, "gradient_clip_val", None)
    if fitting is None:
        fitting = _str(getattr(getattr(trainer, "state", None), "fn", None)) == "fit"
    return TrainerFacts(
        strategy=kind,
        precision=_str(getattr(trainer, "precision", "")) or "",
        device=_str(getattr(getattr(strategy, "root_device", None), "type", None)),
        world_size=world_size if isinstance(world_size, int) else 1,
        fitting=fitting,
        gradient_clip_val=clip if isinstance(clip, (int, float)) else None,
        gradient_clip_algorithm=_str(getattr(trainer, "gradient_clip_algorithm", None)),
    )


def optimizer_steps(trainer: Any, what: str) -> int:
    """The run's optimizer steps, for `what` (a schedule laid out over them); refused when the run has no end."""
    steps = trainer.estimated_stepping_batches
    if steps == float("inf"):
        raise ConfigError("trainer.max_steps", "set trainer.max_steps or trainer.max_epochs",
                          head=f"{what} is laid out over the run's optimizer steps, and this run has no set length")
    return int(steps)
