"""Conversations -> tokens through the chat template: the assistant turns trained, everything else masked.

Config keys (`data.*`):
    train_on:      `all` (default): every assistant turn; `last`: the final assistant turn only (the earlier
                   ones are context). Each trained turn includes the template's end-of-turn token, so the model
                   learns where its turn ends. `data.train_on_source: true` trains on every token of the
                   rendered conversation instead (user and system turns, the template's scaffolding: how
                   Guanaco trained on OASST1's text); that is the one sense of "every turn" not already `all`.
    system_prompt: the system turn of every conversation that has none of its own (None: the template's
                   default, e.g. SmolLM2's "You are a helpful AI assistant named SmolLM ...")
    chat_template: None: the tokenizer's own; `chatml`: the built-in default below; else a Jinja file, or the
                   Jinja text itself. Never applied unasked: a tokenizer without a template is refused.
    source_max_len + target_max_len: one budget for a whole conversation (turns have no source/target split)

Rendering. The tokenizer's chat template renders the whole conversation; the assistant spans are found
from the template's `{% generation %}` markers where it has them, else by rendering prefixes: the turns
before assistant turn i with the generation prompt must be the start of the turns up to i, which must be the
start of the whole rendering. A turn's span runs from its first character to the end-of-turn token
(`core.tokens.end_of_turn_id`) that closes it. A template for which these do not hold (it writes earlier
turns differently once later ones follow, it ignores `add_generation_prompt`, it writes no end-of-turn
token) is refused with the reason. The pieces between the span boundaries are tokenized separately, as
qlora.py tokenizes source and target: label boundaries are exact, and the tokens before the last answer are
the tokens of its generation prompt. (With special-token turn markers, as in ChatML and Llama 3, this is
also the tokenization of the whole text.) BOS is put in front as `core.tokens.prompt_bos` says.

Truncation never cuts inside a turn: a conversation over the budget keeps its system prompt and whole
exchanges (user turn + answer), re-rendered as the shorter conversation it then is: the first exchanges
that fit under `train_on: all` (a kept answer keeps the context it was written in), the last ones under
`last` (the trained turn is the last one). One that cannot keep a single exchange has nothing to train on
and is dropped with the data module's warning naming its row. Generation prompts drop their oldest
exchanges the same way (to `source_max_len`).

The default template, `chatml`: ChatML's layout (`<|im_start|>role\\n ... `) with the tokenizer's EOS closing
every turn (which is `<|im_end|>` for ChatML models), so no token is added to the vocabulary and the
end-of-turn token is one whose embedding was trained. It has `{% generation %}` markers and no default
system prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning_qpeft.core.data_error import DataError
from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.core.tokens import IGNORE_INDEX, end_of_turn_id, prompt_bos
from lightning_qpeft.data.conversations import MESSAGES_COLUMN, is_conversation
from lightning_qpeft.data.readers import record_word
from lightning_qpeft.tasks.templates import ChatTemplate

TRAIN_ON = ("all", "last")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = [{"role": "system", "content": "qpeft system"}, {"role": "user", "content": "qpeft question one"},
          {"role": "assistant", "content": "qpeft answer one"}, {"role": "user", "content": "qpeft question two"},
          {"role": "assistant", "content": "qpeft answer two"}]


@dataclass(frozen=True)
class ChatOptions:
    """How conversations are rendered and trained (the `data.*` keys above).

    Attributes:
        system_prompt: system turn of conversations without one.
        chat_template: None (the tokenizer's), `chatml`, a Jinja file or Jinja text.
        train_on: `all` or `last`.
    """

    system_prompt: Optional[str] = None
    chat_template: Optional[str] = None
    train_on: str = "all"

    def __post_init__(self) -> None:
        if self.train_on not in TRAIN_ON:
            raise ConfigError("data.train_on", repr(self.train_on), "use all (every assistant turn) or last (the "
                              "final one); data.train_on_source: true trains on every token")
        template_text(self.chat_template)


def template_text(value: Optional[str], key: str = "data.chat_template") -> Optional[str]:
    """The Jinja text `value` names: `chatml`, a file, or Jinja text itself (None: None)."""
    if value is None:
        return None
    if value == "chatml":
        return CHATML
    if "{%" in value or "{{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"{value!r} is neither 'chatml', Jinja text, nor a file", "give one of them")
    return path.read_text(encoding="utf-8")


def use_chat_template(tokenizer: Any, value: Optional[str], key: str = "data.chat_template") -> None:
    """Set the tokenizer's chat template as `value` says (None: keep the tokenizer's own)."""
    text = template_text(value, key)
    if text is not None:
        tokenizer.chat_template = text


# ------------------------------------------------------------------------------------------- rendering
def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False,
           spans: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The template's text for `messages`, and the character spans of its `{% generation %}` blocks."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        texts, indices = render_jinja_template(
            [messages], chat_template=tokenizer.get_chat_template(), return_assistant_tokens_mask=spans,
            add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map)
    except Exception as e:  # jinja's raise_exception(), undefined variables, ...
        raise ValueError(f"the chat template fails on it ({type(e).__name__}: {e})") from e
    return texts[0], (indices[0] if spans else [])


def assistant_spans(tokenizer: Any, messages: list[dict], eot: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and one (start, end) character span per assistant turn, each ending right
    after the turn's end-of-turn text `eot`.

    Raises:
        ValueError: with the reason, when the template cannot be split into turns.
    """
    n = sum(m["role"] == "assistant" for m in messages)
    if _MARKERS.search(tokenizer.get_chat_template()):
        text, blocks = render(tokenizer, messages, spans=True)
        if len(blocks) != n:
            raise ValueError(f"its {{% generation %}} blocks mark {len(blocks)} spans in a conversation with {n} "
                             "assistant turns")
        return text, [_closed(text, start, end, eot) for start, end in blocks]
    text, _ = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, _ = render(tokenizer, messages[:i], add_generation_prompt=True)
        if prompt == render(tokenizer, messages[:i])[0]:
            raise ValueError("add_generation_prompt adds nothing, so the assistant header cannot be told from "
                             "the answer")
        turn, _ = render(tokenizer, messages[: i + 1])
        if not turn.startswith(prompt) or not text.startswith(turn):
            raise ValueError(f"the rendering of turns 1-{i} with the assistant header is not the start of the "
                             "rendering of the conversation: the template writes earlier turns differently "
                             "once later ones follow")
        at = turn.rfind(eot, len(prompt))
        if at < 0:
            raise ValueError(f"no end-of-turn token {eot!r} closes assistant turn {i + 1}")
        spans.append((len(prompt), at + len(eot)))
    return text, spans


def _closed(text: str, start: int, end: int, eot: str) -> tuple[int, int]:
    """A generation block's span, ending right after its end-of-turn token (inside the block or just after)."""
    at = text.rfind(eot, start, end)
    if at >= 0:
        return start, at + len(eot)
    if text.startswith(eot, end):
        return start, end + len(eot)
    raise ValueError(f"the end-of-turn token {eot!r} is neither inside a {{% generation %}} block nor right after it")


def eot_text(tokenizer: Any) -> Optional[str]:
    token = end_of_turn_id(tokenizer)
    return None if token is None else tokenizer.convert_ids_to_tokens(token)


def check_template(tokenizer: Any, options: ChatOptions, key: str = "data.chat_template") -> None:
    """Refuse, before any record is tokenized, a tokenizer whose chat template cannot train conversations.

    Args:
        tokenizer: with the chat template to check.
        options: the chat options (`chat_template` None: the tokenizer's own template is checked).
        key: the config key or flag that sets the template, for messages.

    Raises:
        DataError: no chat template, no end-of-turn token, or a template that cannot be split into turns.
    """
    name = key
    key += "" if options.chat_template else " (unset: the tokenizer's own template)"
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{key}: the tokenizer has no chat template, and conversations are rendered with one; set "
                        f"{name} to chatml (ChatML turns closed by the tokenizer's EOS) or to a Jinja file")
    probe = _PROBE
    try:
        render(tokenizer, probe)
    except ValueError:
        probe = _PROBE[1:]  # some templates refuse system turns (Gemma's); records with one are refused by row
        try:
            render(tokenizer, probe)
        except ValueError as e:
            raise DataError(f"{key}: on a two-exchange conversation, {e}") from None
    eot = eot_text(tokenizer)
    if eot is None:
        raise DataError(f"{key}: the template writes no special token after an assistant answer, so a model trained "
                        "on it cannot learn where its turn ends; give a template that closes turns with one (chatml)")
    try:
        text, spans = assistant_spans(tokenizer, probe, eot)
    except ValueError as e:
        raise DataError(f"{key}: the chat template cannot be split into turns: {e}; give one with "
                        "{% generation %} markers, or chatml") from None
    for (start, end), answer in zip(spans, ("qpeft answer one", "qpeft answer two")):
        if answer not in text[start:end]:
            raise DataError(f"{key}: the chat template cannot be split into turns: the span it gives an assistant "
                            f"turn, {text[start:end]!r}, does not hold the answer {answer!r}")


# ------------------------------------------------------------------------------------------- tokenizing
def record_messages(record: dict, system_prompt: Optional[str], with_answer: bool = True) -> list[dict]:
    """A record's conversation: its `messages`, or its instruction + input as a user turn and its output as
    the answer (single-turn records under `template: chat`), with the default system prompt when it has none."""
    messages = record.get(MESSAGES_COLUMN)
    if messages is None:
        user = "\n\n".join(x for x in (record.get("instruction"), record.get("input")) if x)
        messages = [{"role": "user", "content": user}]
        if with_answer:
            messages.append({"role": "assistant", "content": record.get("output") or ""})
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _exchanges(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(system turns, [user, assistant] exchanges)."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    return system, [rest[i:i + 2] for i in range(0, len(rest), 2)]


class ConversationTokenizer:
    """Renders and tokenizes conversations for one tokenizer (BOS and end-of-turn text looked up once).

    Args:
        tokenizer: a tokenizer whose chat template passed `check_template`.
        options: train_on decides the trained turns (the system prompt is `record_messages`').
        train_on_source: train on every token.
    """

    def __init__(self, tokenizer: Any, options: ChatOptions, train_on_source: bool) -> None:
        self.tok, self.options, self.train_on_source = tokenizer, options, train_on_source
        self.bos = prompt_bos(tokenizer)
        self.eot = eot_text(tokenizer)

    def with_bos(self, text: str) -> tuple[str, int]:
        if self.bos and not text.startswith(self.bos):
            return self.bos + text, len(self.bos)
        return text, 0

    def tokens(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """input_ids and labels of a whole conversation."""
        text, spans = assistant_spans(self.tok, messages, self.eot)
        text, shift = self.with_bos(text)
        cuts = [0, *(p + shift for span in spans for p in span), len(text)]
        pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]  # even: context, odd: assistant turn k = i // 2
        trained = range(len(spans)) if self.options.train_on == "all" else range(len(spans) - 1, len(spans))
        ids: list[int] = []
        labels: list[int] = []
        for i, piece_ids in enumerate(self.tok(pieces, add_special_tokens=False)["input_ids"]):
            ids += piece_ids
            keep = self.train_on_source or (i % 2 == 1 and i // 2 in trained)
            labels += piece_ids if keep else [IGNORE_INDEX] * len(piece_ids)
        return ids, labels

    def fitted(self, messages: list[dict], budget: int) -> tuple[list[int], list[int], bool]:
        """The tokens of the conversation, or of its longest whole-exchange cut within `budget` tokens."""
        ids, labels = self.tokens(messages)
        if len(ids) <= budget:
            return ids, labels, False
        system, exchanges = _exchanges(messages)
        n = len(exchanges)
        keep = [exchanges[j:] for j in range(1, n)] if self.options.train_on == "last" else \
            [exchanges[:k] for k in range(n - 1, 0, -1)]
        for kept in keep:
            ids, labels = self.tokens(system + [m for ex in kept for m in ex])
            if len(ids) <= budget:
                return ids, labels, True
        return [], [], True  # not one exchange fits: nothing to train on (the data module drops it)

    def prompt(self, messages: list[dict], max_len: int) -> tuple[list[int], str]:
        """Generation prompt ids and text for a conversation ending with a user turn."""
        system, exchanges = _exchanges(messages)
        for start in range(len(exchanges)):
            kept = system + [m for ex in exchanges[start:] for m in ex]
            text, _ = self.with_bos(render(self.tok, kept, add_generation_prompt=True)[0])
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= max_len:
                break
        return ids[-max_len:], text  # the last user turn alone too long: keep its end, where the question is


def _records(batch: dict[str, list]) -> list[dict]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def tokenize_conversations(batch: dict[str, list], tokenizer: Any, options: ChatOptions, max_len: int,
                           train_on_source: bool, origin: str) -> dict[str, list]:
    """A `datasets.map(batched=True)` function: records -> the columns `collate.tokenize_records` makes
    (input_ids, labels, length, n_supervised, truncated, row), through the chat template."""
    chat = ConversationTokenizer(tokenizer, options, train_on_source)
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "length", "n_supervised", "truncated", "row")}
    for record in _records(batch):
        try:
            ids, labels, cut = chat.fitted(record_messages(record, options.system_prompt), max_len)
        except ValueError as e:
            raise DataError(f"{origin}: {record_word(origin)} {record.get('row', '?')}: {e}") from None
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["n_supervised"].append(sum(1 for x in labels[1:] if x != IGNORE_INDEX))
        out["truncated"].append(cut)
        out["row"].append(record.get("row", 0))
    return out


def conversation_prompts(batch: dict[str, list], tokenizer: Any, options: ChatOptions, source_max_len: int,
                         origin: str) -> dict[str, list]:
    """Generation prompts: the conversation up to (not including) its last assistant turn, rendered with the
    generation prompt; that turn is the reference (the record's `output`)."""
    chat = ConversationTokenizer(tokenizer, options, False)
    out: dict[str, list] = {"input_ids": [], "prompt": []}
    for record in _records(batch):
        messages = record_messages(record, options.system_prompt, with_answer=False)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        try:
            ids, text = chat.prompt(messages, source_max_len)
        except ValueError as e:
            raise DataError(f"{origin}: {record_word(origin)} {record.get('row', '?')}: {e}") from None
        out["input_ids"].append(ids)
        out["prompt"].append(text)
    return out


def prepare_chat(tokenizer: Any, template: Any, records: dict[str, Any], options: ChatOptions,
                 template_key: Optional[str]) -> bool:
    """Whether the records render through the chat template (conversations, or `template: chat`); sets the
    configured template on the tokenizer and checks it, refusing what cannot train.

    Args:
        tokenizer: the data module's tokenizer.
        template: the resolved prompt template.
        records: split -> canonical records.
        options: the data module's chat options.
        template_key: the `data.template` value the user gave (None: the task's or the layout's).
    """
    turns = [split for split, ds in records.items() if is_conversation(ds)]
    if not turns and not isinstance(template, ChatTemplate):
        return False
    if turns and not isinstance(template, ChatTemplate):
        raise DataError(f"data.template: {template_key!r} renders single prompts, and the {turns[0]} records are "
                        "conversations; unset data.template (conversations use the chat template) or set it to chat")
    use_chat_template(tokenizer, options.chat_template)
    check_template(tokenizer, options)
    return True


def training_record(datamodule: Any) -> dict[str, Any]:
    """What `chat` needs to render as training did, for the adapter's `qpeft_training.json`: the chat template
    when it is not the tokenizer's own, and the default system prompt ({} for data not rendered as chat)."""
    if not getattr(datamodule, "chat", False):
        return {}
    options: ChatOptions = datamodule.conversation
    out: dict[str, Any] = {}
    if options.chat_template is not None:
        out["chat_template"] = datamodule.tokenizer.chat_template
    if options.system_prompt:
        out["system_prompt"] = options.system_prompt
    return out
