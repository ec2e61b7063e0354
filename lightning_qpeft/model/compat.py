"""The compatibility table: which PEFT method may meet which base, and what else each method needs or does.

Rows are methods (`configs/adapter/<name>.yaml` and the peft config class it holds), columns are the
`model.quantization` modes (`none` covers every `model.dtype`). A row also carries the method's other facts:
whether it reads the base weight, whether its trainable tensors flatten into FSDP units, what runs after each
optimizer step, whether its schedule is laid out over the run's steps. This table is the single source of:

- the refusals: the rules of `rules.RULES` read the rows; `plan.resolve_plan` runs them before any weight loads;
- whether an adapter can be merged (`merge_refusal()`, used by `python -m lightning_qpeft merge`);
- the README section: `python -m lightning_qpeft.model.compat --markdown` prints it (the table and every rule),
  `--write README.md` replaces it between the markers (a test keeps README equal to the generated section);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from torch import nn

from lightning_qpeft.model.adapters import load_adapter_yaml, method_name, with_total_steps
from lightning_qpeft.model.quantization import QUANT_MODES
from lightning_qpeft.model.rules import FOUR_BIT, RULES, either

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "adapter"
QUANT_COLUMNS: tuple[str, ...] = tuple(QUANT_MODES)
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
        fsdp_flattenable: whether peft's FSDP wrap policy gives its trainable tensors units of their own; False:
            they stay in their decoder layer's unit beside the 16-bit base, which FSDP cannot flatten (measured
            with `distributed.check_flattenable` over configs/adapter).
        after_step: called as `after_step(peft_model, step)` after each optimizer step (0-based), while the
            gradients are still there.
        total_steps: `total_steps(config, n)` is the config with the run's optimizer-step count, for a method
            whose schedule is laid out over the run.
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
    fsdp_flattenable: bool = True
    after_step: Optional[Callable[[nn.Module, int], None]] = None
    total_steps: Optional[Callable[[Any, int], Any]] = None

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

    def supported(self) -> list[str]:
        """The quantization modes it runs on everywhere (the CPU included)."""
        return [m for m in QUANT_COLUMNS if self.cell(m).status is Status.OK]

    def way_out(self) -> str:
        """Where the method runs instead, for a refusal's message."""
        ok, gpu = self.supported(), [m for m in QUANT_COLUMNS if self.cell(m).status is Status.CUDA]
        parts = [f"use {either(ok)}"] if ok else []
        if gpu:
            parts.append(f"{'or ' if ok else 'use '}{either(gpu)} on a GPU")
        return " ".join(parts) or "use another model.adapter (qlora runs on every base)"

    def merge_cell(self, quantization: str) -> Cell:
        """Whether an adapter trained in this cell can be merged (into a freshly dequantized base)."""
        if self.cell(quantization).status is Status.REFUSED:
            return Cell(Status.REFUSED, "the method cannot train on this base")
        return Cell(Status.REFUSED, self.merge) if self.merge else Cell(Status.OK)


def _adalora_update(model: nn.Module, step: int) -> None:
    # AdaLoRA scores each rank's importance from weight x gradient and masks the least important ones (peft:
    # "call update_and_allocate after backward and optimizer.step, before zero_grad")
    model.base_model.update_and_allocate(step)


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
    Method("adalora", "peft.AdaLoraConfig", "SVD-form LoRA whose rank budget is reallocated during training",
           fsdp_flattenable=False, after_step=_adalora_update, total_steps=with_total_steps),
    Method("ia3", "peft.IA3Config", "scaling vectors on keys, values and the MLP input", fsdp_flattenable=False),
    Method("loha", "peft.LoHaConfig", "Hadamard product of two low-rank updates",
           refused=_on(FOUR_BIT, "peft's LoHa has no 4-bit layer (it sizes its factors from the packed 4-bit "
                                 "weight and fails)")),
    Method("lokr", "peft.LoKrConfig", "Kronecker product of a small matrix and a low-rank one",
           refused=_on(FOUR_BIT, "peft's LoKr has no 4-bit layer (it sizes its factors from the packed 4-bit "
                                 "weight and fails)")),
    Method("oft", "peft.OFTConfig", "block-diagonal orthogonal rotation of each weight"),
    Method("boft", "peft.BOFTConfig", "orthogonal rotation as a product of butterfly factors",
           fsdp_flattenable=False),
    Method("vera", "peft.VeraConfig", "two scaling vectors per layer around shared frozen random matrices",
           fsdp_flattenable=False),
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


# ------------------------------------------------------------------------------------------ other uses
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
    lines += ["", "Every refusal, in the order they are checked (`lightning_qpeft/model/rules.py`), before any weight "
              "loads:", ""] + [f"- `{rule.keys}`: {rule.text}." for rule in RULES]
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
