"""Token conventions every layer agrees on: the ignored label, where a prompt starts, where a turn ends.

A tokenizer's BOS is not always a start-of-sequence marker: LLaMA's `<s>` is (the tokenizer writes it before
every text), SmolLM2's BOS is ChatML's `<|im_start|>`, a turn opener that its pretraining never saw at the start
of plain text. `prompt_bos` follows the tokenizer's own convention; `stop_token_ids` lists every token that ends
an answer: EOS and, for chat models, the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

IGNORE_INDEX = -100  # labels the loss skips (PyTorch's cross_entropy default)

_SENTINEL = "qpeftsentinelanswer"


def prompt_bos(tokenizer: Any) -> str:
    """The text to put before a prompt: the tokenizer's BOS when it opens a sequence, else "".

    BOS is written when the tokenizer writes it itself (LLaMA, Mistral), or when it has no chat template that
    uses it as a turn marker (QLoRA's rule: BOS + prompt). A BOS that the chat template writes at every turn
    (ChatML's `<|im_start|>`) is a turn marker, not a sequence start: no prompt gets one.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    if ids and ids[0] == tokenizer.bos_token_id:
        return bos
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and bos in template:
        return ""
    return bos


def end_of_turn_id(tokenizer: Any) -> Optional[int]:
    """The special token the chat template writes right after an assistant answer, or None.

    Found by rendering a one-exchange conversation and reading the first special token after the answer
    (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `</s>` for Llama 2's template).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "qpeftsentinelquestion"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation has no end-of-turn we can read
        return None
    at = text.rfind(_SENTINEL)
    if at < 0:
        return None
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    for token in tokenizer(text[at + len(_SENTINEL):], add_special_tokens=False)["input_ids"]:
        if token in special:
            return int(token)
    return None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Every token that ends a generated answer: EOS, then the chat template's end-of-turn token."""
    ids: list[int] = []
    for token in (getattr(tokenizer, "eos_token_id", None), end_of_turn_id(tokenizer)):
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids


def cut_at_stop(tokens: Any, stop_ids: Sequence[int]) -> tuple[list[list[int]], list[bool]]:
    """Each row's tokens before its first stop token, and whether it stopped there (False: it ran to the limit).

    Args:
        tokens: generated ids, (B, new_tokens) (a tensor, or anything with `.tolist()`).
        stop_ids: the tokens that end an answer.
    """
    rows, stopped = [], []
    stops = set(int(s) for s in stop_ids)
    for row in tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        rows.append(row if end is None else row[:end])
        stopped.append(end is not None)
    return rows, stopped
