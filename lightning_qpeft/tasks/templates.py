"""Prompt templates, as data: each turns a record's `instruction` and `input` into the source text.

Config key: `data.template` (a name below, or `chat` for the tokenizer's own chat template).

The target text is always the record's `output` followed by the tokenizer's EOS token; the source is what
the model reads and what is masked from the loss unless `data.train_on_source` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from lightning_qpeft.core.errors import ConfigError


@dataclass(frozen=True)
class Template:
    """A prompt template.

    Attributes:
        name: the config value.
        with_input: format string used when the record has a non-empty `input`.
        without_input: format string used otherwise.
    """

    name: str
    with_input: str
    without_input: str

    def render(self, record: dict[str, Any], tokenizer: Any = None) -> str:
        fmt = self.with_input if record.get("input") else self.without_input
        return fmt.format(instruction=record.get("instruction") or "", input=record.get("input") or "")


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's chat template: instruction and input as one user turn, then the assistant prompt."""

    name: str = "chat"

    def render(self, record: dict[str, Any], tokenizer: Any = None) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.template", "'chat' needs a tokenizer with a chat template; this one has none")
        user = "\n\n".join(x for x in (record.get("instruction"), record.get("input")) if x)
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )


# QLoRA's ALPACA_PROMPT_DICT, byte for byte (qlora.py), including the trailing space after "Response:".
ALPACA = Template(
    "alpaca",
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
    ),
    without_input=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response: "
    ),
)

# QLoRA's "input-output" format: the record's input is the whole prompt.
PLAIN = Template("plain", with_input="{input}", without_input="{instruction}")

SUMMARIZATION = Template(
    "summarization",
    with_input="Summarize the following text.\n\n{input}\n\nSummary: ",
    without_input="{instruction}\n\nSummary: ",
)

DATA_TO_TEXT = Template(
    "data_to_text",
    with_input="Meaning representation: {input}\nDescription: ",
    without_input="{instruction}\nDescription: ",
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (ALPACA, PLAIN, SUMMARIZATION, DATA_TO_TEXT)}


def get_template(name: str) -> Optional[Template | ChatTemplate]:
    """The template called `name` (a clear error naming `data.template` otherwise)."""
    if name == "chat":
        return ChatTemplate()
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            "data.template", f"unknown template {name!r}", f"choose one of {', '.join([*TEMPLATES, 'chat'])}"
        ) from None
