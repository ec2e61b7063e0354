"""Score MMLU prompts on the A/B/C/D logits at the position after the prompt, in padded batches.

What QLoRA does (qlora.py, `MMLUEvalCallback`), and what is done here:
- the model reads `BOS + prompt` (the source of QLoRA's collator; see `encode_prompts` for LLaMA's BOS);
- at the last prompt position, the logits of the four letter tokens are compared; the argmax is the answer;
- the letter tokens are `tokenizer(letter, add_special_tokens=False).input_ids[0]` (`letter_tokens: qlora`).
  For LLaMA's SentencePiece that is `▁A` (id 319), the token that follows "Answer:" in "Answer: A"; for a
  byte-level BPE it is the bare `A`, which is also what QLoRA's collator trains on (the target "A</s>" is
  tokenized on its own). `letter_tokens: continuation` takes instead the token that continues "Answer:" in
  "Answer: A" (`ĠA` for byte-level BPEs that have it), as few-shot evaluation of a byte-level base model wants.

Batches are planned by a token budget over the prompts sorted longest first (`batch_tokens` = rows x padded
length, at most `batch_size` rows), padded on the right (QLoRA's way) or the left. Each row's last real
position is gathered from the attention mask, so both paddings give the same scores; position ids restart at 0
for every row's first real token. Only the gathered positions go through the LM head (`logits_to_keep`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Optional, Sequence

import torch

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.core.tokens import prompt_bos
from lightning_qpeft.tasks.mmlu_prompt import CHOICES

LETTER_TOKEN_MODES = ("qlora", "continuation")
PADDING_SIDES = ("right", "left")


def letter_token_ids(tokenizer: Any, mode: str = "qlora") -> list[int]:
    """The token id scored for each of A, B, C, D.

    Raises:
        ValueError: unknown mode, or the four letters do not get four distinct single tokens.
    """
    if mode not in LETTER_TOKEN_MODES:
        raise ConfigError("mmlu.letter_tokens", repr(mode), f"choose one of {', '.join(LETTER_TOKEN_MODES)}")
    ids = []
    for letter in CHOICES:
        if mode == "qlora":
            ids.append(tokenizer(letter, add_special_tokens=False)["input_ids"][0])
            continue
        stem = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
        full = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(stem)] != stem or len(full) != len(stem) + 1:
            raise ConfigError(
                "mmlu.letter_tokens", f"continuation: this tokenizer splits ' {letter}' after 'Answer:' into "
                f"{tokenizer.convert_ids_to_tokens(full[len(stem):])}", "use letter_tokens: qlora"
            )
        ids.append(full[-1])
    if len(set(ids)) != 4:
        raise ConfigError("mmlu.letter_tokens", f"{mode}: the letters share tokens {ids}", "use the other mode")
    return ids


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """`BOS + prompt` token ids for each prompt, cut to the last `max_length` tokens; and how many were cut.

    The prompt is encoded on its own and the BOS id put in front: that is what QLoRA's slow LLaMA tokenizer
    gives for f"{bos}{prompt}" ([1, 450 "▁The", ...]); transformers' fast LLaMA tokenizer would instead read
    the text after "<s>" without SentencePiece's leading "▁" ([1, 1576 "The", ...]). For byte-level BPEs both
    are the same. QLoRA cuts the source at `mmlu_source_max_len` from the right, which would drop the question;
    the prompts built here are k-limited so that nothing is cut at the defaults, and an over-long prompt keeps
    its end (the question and "Answer:") instead.
    """
    bos = [tokenizer.bos_token_id] if prompt_bos(tokenizer) else []  # none where BOS is a chat-turn marker
    ids = [bos + x for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    cut = sum(len(x) > max_length for x in ids)
    return [x[-max_length:] for x in ids], cut


def plan_batches(lengths: Sequence[int], batch_tokens: int, batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest prompts first; a batch holds at most `batch_size` rows and
    rows x (its longest length) <= `batch_tokens` (a prompt longer than the budget goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on `side`."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(longest - len(r), longest)
        ids[i, span] = torch.as_tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _is_prompt_learning(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def last_position_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The next-token logits after each row's last real token: (B, vocab), float32, for either padding side."""
    batch, length = input_ids.shape
    # (B,) index of the last 1 in each mask row: T-1 for left padding, len-1 for right padding
    last = (attention_mask * torch.arange(1, length + 1, device=attention_mask.device)).argmax(dim=1)
    rows = torch.arange(batch, device=input_ids.device)
    if _is_prompt_learning(model):
        # peft prepends virtual tokens and handles positions itself: take the whole output and keep the
        # input's positions (the last T)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -length:]
        return logits[rows, last].float()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    if not _accepts_logits_to_keep(model):
        return model(**kwargs).logits[rows, last].float()
    keep, column = torch.unique(last, return_inverse=True)  # the few distinct last positions: (U,), (B,)
    logits = model(**kwargs, logits_to_keep=keep).logits  # (B, U, vocab)
    return logits[rows, column].float()


@torch.no_grad()
def score(
    model: torch.nn.Module,
    encoded: Sequence[Sequence[int]],
    letter_ids: Sequence[int],
    pad_id: int,
    device: torch.device,
    batches: Sequence[Sequence[int]],
    padding_side: str = "right",
    forward_context: Optional[Any] = None,
) -> torch.Tensor:
    """Scores of the questions in `batches` (lists of indices into `encoded`): an (N, 8) float32 tensor on
    `device` whose row i holds question i's four letter logits then the four letters' log-probabilities under
    the full vocabulary; rows of questions not in `batches` stay 0 (so ranks' results add up)."""
    if padding_side not in PADDING_SIDES:
        raise ConfigError("mmlu.padding_side", repr(padding_side), "choose right or left")
    if _is_prompt_learning(model):
        # peft puts the virtual tokens in front of the row: left padding would sit between them and the prompt
        padding_side = "right"
    letters = torch.as_tensor(list(letter_ids), device=device)
    out = torch.zeros((len(encoded), 8), dtype=torch.float32, device=device)
    for batch in batches:
        ids, mask = pad([encoded[i] for i in batch], pad_id, padding_side)
        with forward_context() if forward_context is not None else contextlib.nullcontext():
            logits = last_position_logits(model, ids.to(device), mask.to(device))  # (B, vocab)
        index = torch.as_tensor(batch, device=device)
        out[index, :4] = logits[:, letters]
        out[index, 4:] = torch.log_softmax(logits, dim=-1)[:, letters]
    return out
