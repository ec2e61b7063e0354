"""Tokenize records as QLoRA does, mask the prompt from the loss, and batch them: padded or packed.

Config keys (`data.*`):
    source_max_len:   the prompt (BOS + template) is cut to this many tokens (QLoRA: 384 for Alpaca)
    target_max_len:   the response (output + EOS) is cut to this many tokens (QLoRA: 128)
    train_on_source:  also train on the prompt tokens (QLoRA's default is False)
    packing:          `PackCollator` instead of `PadCollator` for training

A tokenized record is `input_ids = source + target` and `labels = [-100] * len(source) + target` (or
`input_ids` when training on the source). Source and target are tokenized separately with
`add_special_tokens=False`, exactly as qlora.py's DataCollatorForCausalLM, so the peer and we train on the
same tokens. Each record also gets `length`, `n_supervised` (labels the loss sees: the first position is
never predicted), `truncated` and its source `row`, kept in the Arrow cache for batching and statistics.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_qpeft.core.tokens import IGNORE_INDEX, prompt_bos


def _prompt_texts(records: list[dict], tokenizer: Any, template: Any) -> list[str]:
    bos = prompt_bos(tokenizer)  # "" where BOS is a chat-turn marker (SmolLM2's <|im_start|>)
    texts = [template.render(r, tokenizer) for r in records]
    # a chat template usually writes BOS itself: never put a second one in front
    return [t if not bos or t.startswith(bos) else f"{bos}{t}" for t in texts]


def tokenize_records(
    batch: dict[str, list],
    tokenizer: Any,
    template: Any,
    source_max_len: int,
    target_max_len: int,
    train_on_source: bool,
) -> dict[str, list]:
    """A `datasets.map(batched=True)` function: canonical records -> input_ids, labels and bookkeeping."""
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    sources = _prompt_texts(records, tokenizer, template)
    targets = [f"{r['output']}{tokenizer.eos_token or ''}" for r in records]
    src = tokenizer(sources, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(targets, add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "length", "n_supervised", "truncated", "row")}
    for r, s, t in zip(records, src, tgt):
        cut = len(s) > source_max_len or len(t) > target_max_len
        s, t = s[:source_max_len], t[:target_max_len]
        labels = list(s + t) if train_on_source else [IGNORE_INDEX] * len(s) + t
        out["input_ids"].append(s + t)
        out["labels"].append(labels)
        out["length"].append(len(s) + len(t))
        out["n_supervised"].append(sum(1 for x in labels[1:] if x != IGNORE_INDEX))
        out["truncated"].append(cut)
        out["row"].append(r.get("row", 0))
    return out


def tokenize_prompts(batch: dict[str, list], tokenizer: Any, template: Any, source_max_len: int) -> dict:
    """Prompt-only tokenization for generation (predict, generation metrics)."""
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    sources = _prompt_texts(records, tokenizer, template)
    ids = tokenizer(sources, add_special_tokens=False)["input_ids"]
    # keep the end of an over-long prompt: the instruction to answer is there
    return {"input_ids": [x[-source_max_len:] for x in ids], "prompt": sources}


def padded_length(longest: int, multiple: Optional[int]) -> int:
    """`longest` rounded up to a multiple of `multiple` (None: unchanged)."""
    return longest if not multiple else -(-longest // multiple) * multiple


class PadCollator:
    """Right-pads a training batch to its longest record: input_ids, attention_mask, labels (B, T).

    `pad_to_multiple_of` rounds T up (as transformers' collators do): a few distinct shapes instead of one per
    longest record, so that shape-keyed work (torch.compile graphs, cuBLAS and Triton kernel choices) is reused.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = padded_length(max(len(r["input_ids"]) for r in records), self.pad_to_multiple_of)
        ids = torch.full((len(records), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(records), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(records), longest), dtype=torch.long)
        for i, r in enumerate(records):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PackCollator:
    """Flattens a micro-batch into one padding-free row (1, sum of lengths).

    `position_ids` restart at 0 for every record and there is no `attention_mask`: from that, transformers
    (masking_utils.find_packed_sequence_indices for sdpa/eager, cu_seqlens from position_ids for flash
    attention) builds attention that never crosses a record boundary. The first label of every record is
    masked, so no record's first token is predicted from the previous record's last one; the loss then
    covers exactly the tokens a padded batch of the same records covers.
    """

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.cat([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in records])
        labels = torch.cat([torch.as_tensor(r["labels"], dtype=torch.long) for r in records])
        lengths = [len(r["input_ids"]) for r in records]
        positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        labels[starts] = IGNORE_INDEX
        return {"input_ids": ids[None], "labels": labels[None], "position_ids": positions[None]}


class PromptCollator:
    """Left-pads prompts for batched generation (the new tokens then start at the same column); keeps the
    records' other fields as `meta`, one dict a record."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(r["input_ids"]) for r in records)
        ids = torch.full((len(records), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(records), longest), dtype=torch.long)
        for i, r in enumerate(records):
            n = len(r["input_ids"])
            ids[i, longest - n:] = torch.as_tensor(r["input_ids"])
            mask[i, longest - n:] = 1
        meta = [{k: v for k, v in r.items() if k != "input_ids"} for r in records]
        return {"input_ids": ids, "attention_mask": mask, "meta": meta}
