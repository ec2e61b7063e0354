"""The compatibility table: which PEFT method may meet which base, and which other settings it needs.

Rows are methods (`configs/adapter/<name>.yaml` and the peft config class it holds), columns are the
`model.quantization` modes (`none` covers every `model.dtype`). Beside the cells, `RULES` say what other keys
a method needs (`model.gradient_checkpointing`, `model.quant_storage`, `model.dtype`, the adapter's own
fields). This table is the single source of:

- the refusals: `check()` runs in `QPeftModule.__init__`, before any weight loads, and names both keys;
  `check_device()` runs in `configure_model` once the device is known (cells that need CUDA);
- whether an adapter can be merged (`merge_refusal()`, used by `python -m lightning_qpeft merge`);
- the README table: `python -m lightning_qpeft.model.compat --markdown` prints it, `--write README.md`
  replaces it between the markers (a test keeps README equal to the generated table);
- the tests, which are parametrized over `METHODS` x `QUANT_COLUMNS`.

Every OK cell holds on the tiny LLaMA on the CPU at the pinned versions (constraints.txt): a few optimizer steps
train the adapter and leave the base untouched, the export reloads in plain peft with identical logits, generate
works (tests/model/test_adapters.py). CUDA cells are refused on the CPU and checked on a GPU by
benchmarks/adapter_cuda_cells.py. What each refusal rests on: docs/decisions/005-compat-refusals.md.
"""

from __future__ import annotations

import argparse
import enum
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from lightning_qpeft.model.adapters import load_adapter_yaml, method_name
from lightning_qpeft.model.quantization import QUANT_MODES, get_quant_mode

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "adapter"
QUANT_COLUMNS: tuple[str, ...] = tuple(QUANT_MODES)
FOUR_BIT: tuple[str, ...] = tuple(name for name, mode in QUANT_MODES.items() if mode.is_4bit)
QUANTIZED: tuple[str, ...] = tuple(name for name, mode in QUANT_MODES.items() if mode.is_quantized)


class Status(str, enum.Enum):
    OK = "ok"  # runs (verified on the CPU)
    CUDA = "cuda"  # runs on CUDA only; refused on the CPU
    REFUSED = "refused"


@dataclass(frozen=True)
class Cell:
    status: Status
    reason: str = ""


def _on(modes: tuple[str, ...], reason: str) -> dict[str, str]:
    return {mode: reason for mode in modes}


@dataclass(frozen=True)
class Method:
    """One row: a method, its YAML, and the quantization modes it is refused on (and why).

    Attributes:
        name: the YAML's stem under configs/adapter/ and the name in messages (`model.adapter=<name>`).
        config_class: the class_path the YAML holds.
        trains: what it trains, in a few words (README).
        refused: quantization mode -> why the method cannot run on it.
        cuda_only: quantization mode -> why it runs on CUDA only.
        identity_at_init: whether the wrapped model starts with the base model's logits.
        merge: why its adapter cannot be merged into the base (None: it can).
        reads_weight: whether the method reads the base weight itself (see the quant_storage rule).
        alias_of: a row whose rules this one shares and under whose name its configs are recognised
            (qlora is LoRA with other hyperparameters).
    """

    name: str
    config_class: str
    trains: str
    refused: Mapping[str, str] = field(default_factory=dict)
    cuda_only: Mapping[str, str] = field(default_factory=dict)
    identity_at_init: bool = True
    merge: Optional[str] = None
    reads_weight: bool = False
    alias_of: Optional[str] = None

    @property
    def yaml(self) -> Path:
        return CONFIG_DIR / f"{self.name}.yaml"

    @property
    def prompt_learning(self) -> bool:
        return self.config_class in ("peft.PrefixTuningConfig", "peft.PromptTuningConfig", "peft.PromptEncoderConfig")

    def cell(self, quantization: str) -> Cell:
        if quantization in self.refused:
            return Cell(Status.REFUSED, self.refused[quantization])
        if quantization in self.cuda_only:
            return Cell(Status.CUDA, self.cuda_only[quantization])
        return Cell(Status.OK)

    def merge_cell(self, quantization: str) -> Cell:
        """Whether an adapter trained in this cell can be merged (into a freshly dequantized base)."""
        if self.cell(quantization).status is Status.REFUSED:
            return Cell(Status.REFUSED, "the method cannot train on this base")
        return Cell(Status.REFUSED, self.merge) if self.merge else Cell(Status.OK)


NO_GRAD_INTEGERS = ("bitsandbytes stores quantized weights as integers, which take no gradient (only norms and "
                    "embeddings would train)")
PROMPT_MERGE = ("a prompt-learning adapter adds virtual tokens, not weight updates: there is nothing to merge; "
                "serve it with peft (PeftModel.from_pretrained)")
LORA_TRAINS = "low-rank updates B·A beside frozen weights"

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "peft.LoraConfig", f"{LORA_TRAINS} (attention, r=8)"),
    Method("qlora", "peft.LoraConfig", f"{LORA_TRAINS} (every linear layer, r=64: QLoRA)", alias_of="lora"),
    Method("dora", "peft.LoraConfig", "LoRA direction + a trained magnitude per output feature",
           cuda_only=_on(("int8",), "bitsandbytes' CPU int8 matmul fails once DoRA has read the int8 weight "
                                    "(its scale state is lost)")),
    Method("rslora", "peft.LoraConfig", "LoRA scaled by alpha/sqrt(r) (every linear layer, r=64)"),
    Method("pissa", "peft.LoraConfig", "LoRA initialised from the top singular vectors of W; W becomes the residual",
           refused=_on(QUANTIZED, "PiSSA takes the SVD of the weight and writes the residual back, which needs "
                                  "float weights (peft refuses quantized ones)"), reads_weight=True),
    Method("loftq", "lightning_qpeft.model.adapters.LoftQLoraConfig",
           "LoRA initialised to cancel the 4-bit quantization error (LoftQ)",
           refused={"none": "LoftQ initialises LoRA against the error of a 4-bit quantization, and an "
                            "unquantized base has none",
                    "int8": "peft's LoftQ initialisation handles 4-bit layers only",
                    # the initialisation and training run on CUDA, but the export does not load back into plain
                    # peft (docs/decisions/005-compat-refusals.md)
                    **_on(FOUR_BIT, "LoftQ trains on CUDA, but its exported adapter does not load back "
                                    "into peft (state_dict mismatch), so the run's result could not be used; "
                                    "use qlora (LoRA on every linear layer) instead")},
           identity_at_init=False, reads_weight=True),
    Method("adalora", "peft.AdaLoraConfig", "SVD-form LoRA whose rank budget is reallocated during training"),
    Method("ia3", "peft.IA3Config", "scaling vectors on keys, values and the MLP input"),
    Method("loha", "peft.LoHaConfig", "Hadamard product of two low-rank updates",
           refused=_on(FOUR_BIT, "peft's LoHa has no 4-bit layer (it sizes its factors from the packed 4-bit "
                                 "weight and fails)")),
    Method("lokr", "peft.LoKrConfig", "Kronecker product of a small matrix and a low-rank one",
           refused=_on(FOUR_BIT, "peft's LoKr has no 4-bit layer (it sizes its factors from the packed 4-bit "
                                 "weight and fails)")),
    Method("oft", "peft.OFTConfig", "block-diagonal orthogonal rotation of each weight"),
    Method("boft", "peft.BOFTConfig", "orthogonal rotation as a product of butterfly factors"),
    Method("vera", "peft.VeraConfig", "two scaling vectors per layer around shared frozen random matrices"),
    Method("ln_tuning", "peft.LNTuningConfig", "the RMSNorm weights only"),
    Method("hra", "peft.HRAConfig", "a chain of Householder reflections multiplying each weight",
           refused={**_on(FOUR_BIT, "peft's HRA has no 4-bit layer (it multiplies the packed 4-bit weight and "
                                    "fails)"),
                    "int8": "peft's HRA multiplies the stored int8 values as if they were the weight: it trains, "
                            "but computes another function (its logits differ from the base's at initialisation)"}),
    Method("prefix_tuning", "peft.PrefixTuningConfig", "key/value vectors prepended to every attention layer",
           identity_at_init=False, merge=PROMPT_MERGE),
    Method("prompt_tuning", "peft.PromptTuningConfig", "virtual input embeddings (random init)",
           identity_at_init=False, merge=PROMPT_MERGE),
    Method("prompt_tuning_text", "peft.PromptTuningConfig", "virtual input embeddings (initialised from a text)",
           identity_at_init=False, merge=PROMPT_MERGE),
    Method("p_tuning", "peft.PromptEncoderConfig", "virtual input embeddings produced by a small MLP",
           identity_at_init=False, merge=PROMPT_MERGE),
    Method("full", "lightning_qpeft.model.adapters.FullFineTuning", "every weight (the baseline)",
           refused=_on(QUANTIZED, NO_GRAD_INTEGERS),
           merge="a full fine-tuning export is already a complete model folder: load it with from_pretrained",
           reads_weight=True),
)}


def lookup(adapter: Any) -> tuple[str, Optional[Method]]:
    """(name, row) of an adapter config; the row is None for a method the table does not know."""
    name = method_name(adapter)
    return name, METHODS.get(name)


# ------------------------------------------------------------------------------------------ other rules
@dataclass(frozen=True)
class Setting:
    """What the rules look at: the adapter and the keys that interact with it."""

    adapter: Any
    name: str
    method: Optional[Method]
    quantization: str
    gradient_checkpointing: bool = False
    quant_storage: str = "uint8"
    dtype: str = "auto"
    packing: bool = False
    upcast_norms: bool = True
    compute_dtype: str = "bfloat16"
    precision: str = ""  # trainer.precision, where known (QPeftModule.setup)

    @property
    def weights_dtype(self) -> str:
        """The dtype of the unquantized weights (norms, embeddings): the compute dtype on quantized bases."""
        return self.compute_dtype if get_quant_mode(self.quantization).is_quantized and self.dtype == "auto" \
            else self.dtype


@dataclass(frozen=True)
class Rule:
    """A refusal that involves a key other than model.quantization.

    Attributes:
        keys: the config keys involved (README).
        text: the rule in words (README).
        refuses: the message when `Setting` breaks the rule, else None.
    """

    keys: str
    text: str
    refuses: Callable[[Setting], Optional[str]]


def _prefix_checkpointing(s: Setting) -> Optional[str]:
    if s.name == "prefix_tuning" and s.gradient_checkpointing:
        return ("model.adapter=prefix_tuning cannot run with model.gradient_checkpointing=true: checkpointed "
                "layers run without a key/value cache and peft passes the prefix as that cache (peft refuses "
                "it); set model.gradient_checkpointing=false")
    return None


def _float_storage(s: Setting) -> Optional[str]:
    if s.method is not None and s.method.reads_weight and s.quantization in FOUR_BIT and s.quant_storage not in ("uint8", "auto"):
        return (f"model.adapter={s.name} cannot run with model.quant_storage={s.quant_storage}: with a float storage "
                f"dtype the packed 4-bit weights look like ordinary float tensors, and {s.name} reads the weight "
                "itself, so it would compute on packed bytes without failing; use model.quant_storage=uint8 "
                "(float storage is only for FSDP)")
    return None


# AdamW steps smaller than half a weight's rounding step are lost in 16-bit weights (bfloat16 keeps 8 bits of
# mantissa: around 1.0 the step is 0.0078); Lightning's mixed precision autocasts matmuls but keeps the
# parameters in the dtype they were loaded in, so there is no float32 master copy to absorb them.
LOST_UPDATES = "AdamW's updates smaller than the 16-bit rounding step of a weight are lost"


def _full_fp32(s: Setting) -> Optional[str]:
    if s.name == "full" and s.dtype != "float32":
        return (f"model.adapter=full cannot run with model.dtype={s.dtype}: every weight trains, in the dtype it is "
                f"loaded in, with no float32 master copy, and {LOST_UPDATES}; use model.dtype=float32 "
                "(trainer.precision=bf16-mixed still computes in bfloat16)")
    return None


def _ln_tuning_fp32_norms(s: Setting) -> Optional[str]:
    if s.name == "ln_tuning" and not s.upcast_norms and s.weights_dtype != "float32":
        return (f"model.adapter=ln_tuning cannot run with model.upcast_norms=false: the trained norm weights would "
                f"stay in {s.weights_dtype if s.weights_dtype != 'auto' else 'the checkpoint dtype'}, and "
                f"{LOST_UPDATES}; set model.upcast_norms=true")
    return None


def _prompt_packing(s: Setting) -> Optional[str]:
    if s.method is not None and s.method.prompt_learning and s.packing:
        return (f"model.adapter={s.name} cannot run with data.packing=true: the virtual tokens are prepended once "
                "per row, not per packed record, and peft drops the position_ids that separate the records; "
                "set data.packing=false")
    return None


def _randomized_pissa(s: Setting) -> Optional[str]:
    init = getattr(s.adapter, "init_lora_weights", None)
    if s.name == "pissa" and isinstance(init, str) and init.startswith("pissa_niter"):
        return (f"model.adapter=pissa cannot use model.adapter.init_args.init_lora_weights={init}: peft re-runs "
                "the randomized SVD when it loads the adapter, so the export would not reproduce the trained "
                "model; use init_lora_weights=pissa")
    return None


def _fp32_norms_without_autocast(s: Setting) -> Optional[str]:
    if s.precision in FULL_PRECISION and s.upcast_norms and s.weights_dtype in ("bfloat16", "float16"):
        return (f"model.dtype={s.weights_dtype} cannot run with trainer.precision={s.precision} and "
                "model.upcast_norms=true: the float32 norm weights turn every activation into float32, which then "
                f"meets the {s.weights_dtype} weights in a matmul with no autocast to reconcile them; use "
                f"trainer.precision=bf16-mixed (or bf16-true), or model.upcast_norms=false")
    return None


FULL_PRECISION = ("32-true", "32", "64-true", "64")

RULES: tuple[Rule, ...] = (
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
)

# rules that hold whatever the adapter (also for a bare base: evaluation, generation)
ADAPTER_FREE_RULES = (_fp32_norms_without_autocast,)


# ------------------------------------------------------------------------------------------ checks
def _or(modes: list[str]) -> str:
    return modes[0] if len(modes) == 1 else ", ".join(modes[:-1]) + " or " + modes[-1]


def way_out(method: Method) -> str:
    ok = [m for m in QUANT_COLUMNS if method.cell(m).status is Status.OK]
    gpu = [m for m in QUANT_COLUMNS if method.cell(m).status is Status.CUDA]
    parts = [f"use {_or(ok)}"] if ok else []
    if gpu:
        parts.append(f"{'or ' if ok else 'use '}{_or(gpu)} on a GPU")
    return " ".join(parts) or "use another model.adapter (qlora runs on every base)"


def check(
    adapter: Any,
    quantization: str,
    gradient_checkpointing: bool = False,
    quant_storage: str = "uint8",
    dtype: str = "auto",
    packing: bool = False,
    upcast_norms: bool = True,
    compute_dtype: str = "bfloat16",
    precision: str = "",
) -> Optional[Method]:
    """Refuse an impossible combination (ValueError naming both keys); return the method's row.

    The arguments are the `model.*` keys of the same names (`packing` is `data.packing`, `precision` is
    `trainer.precision`: QPeftModule checks both again in `setup`, when the trainer and data module are known).
    Device-independent: cells that need CUDA pass here and are checked by `check_device`.
    """
    if adapter is None:
        bare = Setting(None, "none", None, quantization, gradient_checkpointing, quant_storage, dtype, packing,
                       upcast_norms, compute_dtype, precision)
        for refuses in ADAPTER_FREE_RULES:
            message = refuses(bare)
            if message:
                raise ValueError(message)
        return None
    mode = get_quant_mode(quantization)
    name, method = lookup(adapter)
    if method is None:
        if mode.is_quantized:
            raise ValueError(
                f"model.adapter={name} cannot run with model.quantization={quantization}: {name} has no row in the "
                "compatibility table (lightning_qpeft/model/compat.py), so nothing says its peft layer is correct "
                f"on a {mode.bits}-bit base; use model.quantization=none, or verify it and add a row")
        warnings.warn(f"model.adapter={name} is not in the compatibility table (lightning_qpeft/model/compat.py): "
                      "unverified on this project", stacklevel=2)
    else:
        cell = method.cell(quantization)
        if cell.status is Status.REFUSED:
            raise ValueError(f"model.adapter={name} cannot run with model.quantization={quantization}: "
                             f"{cell.reason}; {way_out(method)}")
    setting = Setting(adapter, name, method, quantization, gradient_checkpointing, quant_storage, dtype, packing,
                      upcast_norms, compute_dtype, precision)
    for rule in RULES:
        message = rule.refuses(setting)
        if message:
            raise ValueError(message)
    return method


def check_device(adapter: Any, quantization: str, device: torch.device | str) -> None:
    """Refuse, before the base loads, a cell that needs CUDA on another device."""
    name, method = lookup(adapter)
    if method is None or torch.device(device).type == "cuda":
        return
    cell = method.cell(quantization)
    if cell.status is Status.CUDA:
        ok = [m for m in QUANT_COLUMNS if method.cell(m).status is Status.OK]
        alternative = f", or use model.quantization={_or(ok)}" if ok else ""
        raise ValueError(f"model.adapter={name} cannot run with model.quantization={quantization} on "
                         f"{torch.device(device).type}: {cell.reason}; train on a GPU (trainer.accelerator=gpu)"
                         f"{alternative}")


def merge_refusal(adapter: Any) -> Optional[str]:
    """Why an adapter of this config cannot be merged into its base (None: it can)."""
    if getattr(adapter, "is_prompt_learning", False):
        return PROMPT_MERGE
    _, method = lookup(adapter)
    return method.merge if method is not None else None


def load_method_config(method: Method | str, base_model: str = "checkpoints/tiny-llama", **init_args: Any) -> Any:
    """The row's YAML, parsed and instantiated as the CLI does (with `init_args` overriding its fields)."""
    method = METHODS[method] if isinstance(method, str) else method
    return load_adapter_yaml(method.yaml, base_model=base_model, **init_args)


def cells() -> list[tuple[Method, str, Cell]]:
    """Every (method, quantization, cell) of the table, rows in order."""
    return [(m, q, m.cell(q)) for m in METHODS.values() for q in QUANT_COLUMNS]


# ------------------------------------------------------------------------------------------ docs
MARKERS = ("<!-- compat-table:start (generated: python -m lightning_qpeft.model.compat --write README.md) -->",
           "<!-- compat-table:end -->")
_PARAMS = re.compile(r"Llama-2-7B: ([\d,]+) trainable parameters")


def yaml_params(method: Method) -> Optional[int]:
    """The Llama-2-7B trainable parameter count quoted in the row's YAML (checked by a test)."""
    found = _PARAMS.search(method.yaml.read_text()) if method.yaml.exists() else None
    return int(found.group(1).replace(",", "")) if found else None


def _human(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def markdown() -> str:
    """The README section: methods x quantization modes, with numbered reasons and the other rules."""
    notes: list[str] = []

    def note(reason: str) -> int:
        if reason not in notes:
            notes.append(reason)
        return notes.index(reason) + 1

    def mark(cell: Cell) -> str:
        if cell.status is Status.OK:
            return "✓"
        return f"{'GPU' if cell.status is Status.CUDA else '✗'} [{note(cell.reason)}]"

    head = ["method", "trains", *QUANT_COLUMNS, "merge", "starts as base", "trainable (7B)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS.values():
        marks = [mark(m.cell(q)) for q in QUANT_COLUMNS]
        merge = "✓" if m.merge is None else f"✗ [{note(m.merge)}]"
        row = [f"[{m.name}](configs/adapter/{m.name}.yaml)", m.trains, *marks, merge,
               "yes" if m.identity_at_init else "no", _human(yaml_params(m))]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "✓ runs (tested on the CPU in CI); GPU: runs on CUDA only, refused on the CPU; ✗ refused before "
              "any weight loads, with the message below. `none` is any `model.dtype` (float32, bfloat16, float16). "
              "Merging always goes into a freshly loaded, dequantized base (`python -m lightning_qpeft merge`)."]
    lines += [""] + [f"{i}. {reason}" for i, reason in enumerate(notes, 1)]
    lines += ["", "Other keys:", ""] + [f"- `{rule.keys}`: {rule.text}." for rule in RULES]
    return "\n".join([MARKERS[0], *lines, MARKERS[1]])


def replace_section(text: str) -> str:
    """`text` (the README) with its generated section replaced by `markdown()`."""
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start < 0 or end < 0:
        raise ValueError(f"README.md: markers {MARKERS[0]!r} ... {MARKERS[1]!r} not found")
    return text[:start] + markdown() + text[end + len(MARKERS[1]):]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_qpeft.model.compat", description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--write", metavar="README", help="replace the table between the markers in this file")
    args = parser.parse_args(argv)
    if args.write:
        from lightning_qpeft.utils.atomic import atomic_file

        path = Path(args.write)
        new = replace_section(path.read_text())
        with atomic_file(path, "w") as f:
            f.write(new)
    if args.markdown or not args.write:
        print(markdown())


if __name__ == "__main__":
    main()
