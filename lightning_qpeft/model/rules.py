"""Every refusal of a run's configuration, as one table (`RULES`) beside the method table (`compat.METHODS`).

A rule looks at a `Setting` (the configuration, the trainer's facts, the method's row and what the plan derived
from them) and returns a `ConfigError` naming the key, the reason and the way out, or None. `plan.resolve_plan`
runs the table in order and raises the first refusal; README's compatibility section lists every rule
(`compat.markdown`). A rule that needs a trainer fact passes while the fact is unknown (None).

Per-method facts (which quantization modes a method runs on, whether its tensors flatten into FSDP units,
whether it reads the base weight) are fields of the method's row in `compat.METHODS`; the rules read them there.
Messages carry the reason and the way out; what each refusal rests on is in docs/decisions/ (the compat note).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.model.facts import RunConfig, TrainerFacts
from lightning_qpeft.model.quantization import QUANT_MODES, get_quant_mode

FOUR_BIT: tuple[str, ...] = tuple(name for name, mode in QUANT_MODES.items() if mode.is_4bit)
FULL_PRECISION = ("32-true", "32", "64-true", "64")
# AdamW steps smaller than half a weight's rounding step are lost in 16-bit weights (bfloat16 keeps 8 bits of
# mantissa: around 1.0 the step is 0.0078); Lightning's mixed precision autocasts matmuls but keeps the
# parameters in the dtype they were loaded in, so there is no float32 master copy to absorb them.
LOST_UPDATES = "AdamW's updates smaller than the 16-bit rounding step of a weight are lost"


@dataclass(frozen=True)
class Setting:
    """What the rules look at.

    Attributes:
        config, facts: the plan's inputs.
        name: the method's name (`none` for a bare base).
        method: its row in `compat.METHODS` (None: a bare base, or a method the table does not know).
        quant_storage, upcast_norms: as the plan resolved them for this strategy ("auto" made concrete; FSDP
            keeps norms in the weights' dtype).
    """

    config: RunConfig
    facts: TrainerFacts
    name: str
    method: Any
    quant_storage: str
    upcast_norms: bool

    @property
    def fsdp(self) -> bool:
        return self.facts.strategy == "fsdp"

    @property
    def prompt_learning(self) -> bool:
        return bool(getattr(self.config.adapter, "is_prompt_learning", False))

    @property
    def weights_dtype(self) -> str:
        """The dtype of the unquantized weights (norms, embeddings): the compute dtype on quantized bases."""
        c = self.config
        return c.compute_dtype if get_quant_mode(c.quantization).is_quantized and c.dtype == "auto" else c.dtype


@dataclass(frozen=True)
class Rule:
    """One refusal.

    Attributes:
        keys: the config keys involved (README).
        text: the rule in words (README).
        refuses: the refusal when a `Setting` breaks the rule, else None.
    """

    keys: str
    text: str
    refuses: Callable[[Setting], Optional[ConfigError]]


def _cannot(what: str, other: str) -> str:
    return f"{what} cannot run with {other}"


# ------------------------------------------------------------------------------------------ the configuration
def _adapter_and_path(s: Setting) -> Optional[ConfigError]:
    c = s.config
    if c.adapter is not None and c.adapter_path is not None and not c.adapter_from_path:
        return ConfigError("model.adapter_path", "set one (a new adapter, or a trained one)",
                           head="model.adapter and model.adapter_path")
    return None


def _quantization_cell(s: Setting) -> Optional[ConfigError]:
    q = s.config.quantization
    head = _cannot(f"model.adapter={s.name}", f"model.quantization={q}")
    if s.method is None:
        mode = get_quant_mode(q)
        if s.config.adapter is not None and mode.is_quantized:
            return ConfigError("model.quantization",
                               f"{s.name} has no row in the compatibility table (lightning_qpeft/model/compat.py), so "
                               f"nothing says its peft layer is correct on a {mode.bits}-bit base",
                               "use model.quantization=none, or verify it and add a row", head=head)
        return None
    reason = s.method.refused.get(q)
    return ConfigError("model.quantization", reason, s.method.way_out(), head=head) if reason else None


def _prefix_checkpointing(s: Setting) -> Optional[ConfigError]:
    if s.name == "prefix_tuning" and s.config.gradient_checkpointing:
        return ConfigError("model.gradient_checkpointing",
                           "checkpointed layers run without a key/value cache and peft passes the prefix as that "
                           "cache (peft refuses it)", "set model.gradient_checkpointing=false",
                           head=_cannot("model.adapter=prefix_tuning", "model.gradient_checkpointing=true"))
    return None


def _float_storage(s: Setting) -> Optional[ConfigError]:
    if s.method is not None and s.method.reads_weight and s.config.quantization in FOUR_BIT \
            and s.quant_storage not in ("uint8", "auto"):
        return ConfigError("model.quant_storage",
                           "with a float storage dtype the packed 4-bit weights look like ordinary float tensors, "
                           f"and {s.name} reads the weight itself, so it would compute on packed bytes without "
                           "failing", "use model.quant_storage=uint8 (float storage is only for FSDP)",
                           head=_cannot(f"model.adapter={s.name}", f"model.quant_storage={s.quant_storage}"))
    return None


def _prompt_packing(s: Setting) -> Optional[ConfigError]:
    if s.method is not None and s.method.prompt_learning and s.config.packing:
        return ConfigError("data.packing",
                           "the virtual tokens are prepended once per row, not per packed record, and peft drops the "
                           "position_ids that separate the records", "set data.packing=false",
                           head=_cannot(f"model.adapter={s.name}", "data.packing=true"))
    return None


def _full_fp32(s: Setting) -> Optional[ConfigError]:
    if s.name == "full" and s.config.dtype != "float32":
        return ConfigError("model.dtype",
                           "every weight trains, in the dtype it is loaded in, with no float32 master copy, and "
                           f"{LOST_UPDATES}",
                           "use model.dtype=float32 (trainer.precision=bf16-mixed still computes in bfloat16)",
                           head=_cannot("model.adapter=full", f"model.dtype={s.config.dtype}"))
    return None


def _ln_tuning_fp32_norms(s: Setting) -> Optional[ConfigError]:
    if s.name == "ln_tuning" and not s.upcast_norms and s.weights_dtype != "float32":
        stays = s.weights_dtype if s.weights_dtype != "auto" else "the checkpoint dtype"
        return ConfigError("model.upcast_norms",
                           f"the trained norm weights would stay in {stays}, and {LOST_UPDATES}",
                           "set model.upcast_norms=true",
                           head=_cannot("model.adapter=ln_tuning", "model.upcast_norms=false"))
    return None


def _randomized_pissa(s: Setting) -> Optional[ConfigError]:
    init = getattr(s.config.adapter, "init_lora_weights", None)
    if s.name == "pissa" and isinstance(init, str) and init.startswith("pissa_niter"):
        return ConfigError("model.adapter.init_args.init_lora_weights",
                           "peft re-runs the randomized SVD when it loads the adapter, so the export would not "
                           "reproduce the trained model", "use init_lora_weights=pissa",
                           head=f"model.adapter=pissa cannot use model.adapter.init_args.init_lora_weights={init}")
    return None


def _fp32_norms_without_autocast(s: Setting) -> Optional[ConfigError]:
    precision = s.facts.precision  # the norms as resolved: under FSDP they stay in the weights' dtype
    if precision in FULL_PRECISION and s.upcast_norms and s.weights_dtype in ("bfloat16", "float16"):
        return ConfigError("trainer.precision",
                           "the float32 norm weights turn every activation into float32, which then meets the "
                           f"{s.weights_dtype} weights in a matmul with no autocast to reconcile them",
                           "use trainer.precision=bf16-mixed (or bf16-true), or model.upcast_norms=false",
                           head=f"model.dtype={s.weights_dtype} cannot run with trainer.precision={precision} and "
                                "model.upcast_norms=true")
    return None


def _decoder_loss_with_virtual_tokens(s: Setting) -> Optional[ConfigError]:
    if s.config.loss != "standard" and s.prompt_learning:
        return ConfigError("model.loss", f"{s.config.loss} calls the decoder directly, which skips the virtual "
                                         f"tokens of {s.name}", "use model.loss: standard")
    return None


def _compile_dequantize_without_compile(s: Setting) -> Optional[ConfigError]:
    if s.config.compile_dequantize and not s.config.compile:
        return ConfigError("model.compile_dequantize", "true changes what torch.compile traces",
                           "it needs model.compile: true")
    return None


def _pad_multiple_with_packing(s: Setting) -> Optional[ConfigError]:
    if s.config.pad_to_multiple_of and s.config.packing:
        return ConfigError("data.pad_to_multiple_of", "set one",
                           head="data.pad_to_multiple_of pads batches; data.packing makes padding-free rows")
    return None


# ------------------------------------------------------------------------------------------ the trainer's facts
def fsdp_param_dtype_name(precision: str) -> Optional[str]:
    """The 16-bit dtype FSDP's mixed precision casts parameters to for a precision string (None: float32)."""
    return "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else None


def _fsdp_int8(s: Setting) -> Optional[ConfigError]:
    if s.fsdp and get_quant_mode(s.config.quantization).bits == 8:
        return ConfigError("trainer.strategy", "FSDP shards float tensors only and int8 weights are integers",
                           "use nf4/nf4-dq/fp4 (4-bit storage is made float) or trainer.strategy=ddp",
                           head=_cannot("model.quantization=int8", "trainer.strategy=fsdp"))
    return None


def _fsdp_unflattenable(s: Setting) -> Optional[ConfigError]:
    if s.fsdp and s.method is not None and not s.method.fsdp_flattenable:
        return ConfigError("trainer.strategy",
                           "its float32 tensors live inside the decoder layers' FSDP units beside the bfloat16 base, "
                           "and FSDP flattens a unit into one dtype",
                           "use trainer.strategy=ddp, or an adapter made of layers (lora, prompt_tuning)",
                           head=_cannot(f"model.adapter={s.name}", "trainer.strategy=fsdp"))
    return None


def _fsdp_float32_with_4bit(s: Setting) -> Optional[ConfigError]:
    p = s.facts.precision
    if s.fsdp and get_quant_mode(s.config.quantization).is_4bit and fsdp_param_dtype_name(p) is None:
        return ConfigError("trainer.precision", "FSDP would cast the packed 4-bit weights to float32 and corrupt "
                                                "them", "use bf16-mixed",
                           head=f"trainer.precision={p} cannot run a 4-bit base with trainer.strategy=fsdp")
    return None


def _fsdp_storage(s: Setting) -> Optional[ConfigError]:
    c, p = s.config, s.facts.precision
    wanted = fsdp_param_dtype_name(p)
    if s.fsdp and get_quant_mode(c.quantization).is_4bit and c.quant_storage not in ("auto", wanted):
        return ConfigError("model.quant_storage", f"it must be {wanted} (or auto)",
                           head=f"model.quant_storage={c.quant_storage} cannot run with trainer.strategy=fsdp at "
                                f"trainer.precision={p}")
    return None


def _fsdp_clip_by_value(s: Setting) -> Optional[ConfigError]:
    algorithm = s.facts.gradient_clip_algorithm
    if s.fsdp and s.facts.gradient_clip_val and algorithm not in (None, "norm"):
        return ConfigError("trainer.gradient_clip_algorithm", "FSDP clips by the norm over every rank's shard",
                           "use norm",
                           head=_cannot(f"trainer.gradient_clip_algorithm={algorithm}", "trainer.strategy=fsdp"))
    return None


def _cuda_only_cell(s: Setting) -> Optional[ConfigError]:
    device, q = s.facts.device, s.config.quantization
    reason = s.method.cuda_only.get(q) if s.method is not None else None
    if device is None or device == "cuda" or not reason:
        return None
    ok = s.method.supported()
    return ConfigError("trainer.accelerator", reason, "train on a GPU (trainer.accelerator=gpu)"
                       + (f", or use model.quantization={either(ok)}" if ok else ""),
                       head=_cannot(f"model.adapter={s.name}", f"model.quantization={q} on {device}"))


def _liger_off_cuda(s: Setting) -> Optional[ConfigError]:
    device = s.facts.device
    if s.config.loss == "liger" and device is not None and device != "cuda":
        return ConfigError("model.loss", f"liger runs on CUDA only (this run is on {device})",
                           "use model.loss: fused or chunked")
    return None


def _nothing_to_train(s: Setting) -> Optional[ConfigError]:
    if s.facts.fitting and s.config.adapter is None:
        return nothing_to_train(s.name)
    return None


def nothing_to_train(method: str) -> ConfigError:
    """The refusal of a fit with no trainable tensor (also the optimizer's check once the model is built)."""
    return ConfigError("model.adapter", f"{method} leaves nothing to train",
                       "set model.adapter (e.g. --model.adapter configs/adapter/qlora.yaml) to fine-tune")


def _trained_prompt_learning(s: Setting) -> Optional[ConfigError]:
    if s.facts.fitting and s.config.adapter_from_path and s.prompt_learning:
        return ConfigError("model.adapter_path", f"{s.name} adapters load for evaluation only (peft cannot make a "
                                                 "trained prompt-learning adapter trainable again)",
                           "train a new one with model.adapter")
    return None


def either(modes: list[str]) -> str:
    """`a`, `a or b`, `a, b or c`."""
    return modes[0] if len(modes) == 1 else ", ".join(modes[:-1]) + " or " + modes[-1]


RULES: tuple[Rule, ...] = (
    Rule("model.adapter, model.adapter_path", "a new adapter or a trained one, not both", _adapter_and_path),
    Rule("model.quantization", "the cells of the table above; a method without a row is refused on quantized bases "
         "(and warned about on unquantized ones)", _quantization_cell),
    Rule("model.gradient_checkpointing", "prefix_tuning refuses gradient checkpointing", _prefix_checkpointing),
    Rule("model.quant_storage", "methods that read the base weight (pissa, loftq, full) refuse a float "
         "quant_storage on 4-bit bases: they would silently compute on packed bytes", _float_storage),
    Rule("data.packing", "prompt-learning methods (prefix, prompt, p-tuning) refuse packed batches",
         _prompt_packing),
    Rule("model.dtype", "full fine-tuning needs float32 weights (16-bit weights without a float32 master copy "
         "lose AdamW's small updates)", _full_fp32),
    Rule("model.upcast_norms", "ln_tuning needs float32 norm weights (same reason)", _ln_tuning_fp32_norms),
    Rule("model.adapter.init_args.init_lora_weights", "pissa_niter_K is refused: its export does not reload "
         "identically", _randomized_pissa),
    Rule("trainer.precision", "16-bit weights (model.dtype, or compute_dtype on a quantized base) with float32 norms "
         "need autocast: 32-true is refused unless model.upcast_norms=false", _fp32_norms_without_autocast),
    Rule("model.loss", "fused, chunked and liger call the decoder directly: prompt-learning methods need standard",
         _decoder_loss_with_virtual_tokens),
    Rule("model.compile_dequantize", "needs model.compile: true", _compile_dequantize_without_compile),
    Rule("data.pad_to_multiple_of", "pads batches, and data.packing makes padding-free rows: set one",
         _pad_multiple_with_packing),
    Rule("trainer.strategy=fsdp, model.quantization", "int8 bases are refused (FSDP shards float tensors only)",
         _fsdp_int8),
    Rule("trainer.strategy=fsdp, model.adapter", "methods whose float32 tensors share the decoder layers' FSDP units "
         "(ia3, vera, adalora, boft) are refused; a method without a row is checked once built", _fsdp_unflattenable),
    Rule("trainer.strategy=fsdp, trainer.precision", "4-bit bases need a 16-bit trainer.precision (bf16-mixed): FSDP "
         "would cast the packed weights to float32", _fsdp_float32_with_4bit),
    Rule("trainer.strategy=fsdp, model.quant_storage", "model.quant_storage must be auto or the precision's 16-bit "
         "dtype", _fsdp_storage),
    Rule("trainer.strategy=fsdp, trainer.gradient_clip_algorithm", "trainer.gradient_clip_algorithm must be norm "
         "(FSDP clips the norm over every rank's shard)", _fsdp_clip_by_value),
    Rule("trainer.accelerator, model.quantization", "GPU cells of the table are refused on other devices, before the "
         "base loads", _cuda_only_cell),
    Rule("model.loss", "liger runs on CUDA only", _liger_off_cuda),
    Rule("model.adapter", "fit needs something to train: a bare base (no adapter) is for evaluation",
         _nothing_to_train),
    Rule("model.adapter_path", "a trained prompt-learning adapter loads for evaluation only (fit trains a new one)",
         _trained_prompt_learning),
)


def first_refusal(setting: Setting) -> Optional[ConfigError]:
    """The first rule of `RULES` the setting breaks (None: it breaks none)."""
    for rule in RULES:
        refusal = rule.refuses(setting)
        if refusal is not None:
            return refusal
    return None
