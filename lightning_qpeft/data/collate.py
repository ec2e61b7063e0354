"""Tokenize records as QLoRA does, mask the prompt from the loss, and pad batches dynamically.

Config keys (`data.*`):
    source_max_len:   the prompt (BOS + template) is cut to this many tokens (QLoRA: 384 for Alpaca)
    target_max_len:   the response (output + EOS) is cut to this many tokens (QLoRA: 128)
    train_on_source:  also train on the prompt tokens (QLoRA's default is False)

A tokenized record is `input_ids = source + target` and `labels = [-100] * len(source) + target` (or
`input_ids` when training on the source). Source and target are tokenized separately with
`add_special_tokens=False`, exactly as qlora.py's DataCollatorForCausalLM, so the peer and we train on the
same tokens.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


def tokenize_records(
    batch: dict[str, list],
    tokenizer: Any,
    template: Any,
    source_max_len: int,
    target_max_len: int,
    train_on_source: bool,
) -> dict[str, list]:
    """A `datasets.map(batched=True)` function: records -> input_ids, labels, source_len."""
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    sources = [f"{tokenizer.bos_token or ''}{template.render(r, tokenizer)}" for r in records]
    targets = [f"{r['output']}{tokenizer.eos_token}" for r in records]
    src = tokenizer(sources, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(targets, add_special_tokens=False)["input_ids"]
    input_ids, labels, source_len, truncated = [], [], [], []
    for s, t in zip(src, tgt):
        cut = len(s) > source_max_len or len(t) > target_max_len
        s, t = s[:source_max_len], t[:target_max_len]
        input_ids.append(s + t)
        labels.append(list(s + t) if train_on_source else [IGNORE_INDEX] * len(s) + t)
        source_len.append(len(s))
        truncated.append(cut)
    return {"input_ids": input_ids, "labels": labels, "source_len": source_len, "truncated": truncated}


def tokenize_prompts(batch: dict[str, list], tokenizer: Any, template: Any, source_max_len: int) -> dict:
    """Prompt-only tokenization for generation (predict, generation metrics)."""
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    sources = [f"{tokenizer.bos_token or ''}{template.render(r, tokenizer)}" for r in records]
    ids = tokenizer(sources, add_special_tokens=False)["input_ids"]
    # keep the end of an over-long prompt: the instruction to answer is there
    return {"input_ids": [x[-source_max_len:] for x in ids], "prompt": sources}


class PadCollator:
    """Right-pads a training batch to its longest record: input_ids, attention_mask, labels (B, T)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in records)
        ids = torch.full((len(records), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(records), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(records), longest), dtype=torch.long)
        for i, r in enumerate(records):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
