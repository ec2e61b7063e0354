"""The `random-tokens` task: fixed-length records of random token ids, for speed and memory measurements.

Config keys (`data.*`, with `data.task: random-tokens`):
    source_max_len, target_max_len:  every record is exactly source_max_len + target_max_len tokens
                                     (default 384 + 128 = 512, the peer's fixed-length benchmark)
    train_on_source:                 true: labels = input_ids, every token supervised (as the peer's
                                     `model(input_ids=x, labels=x)`); false: the first source_max_len masked
    max_train_records, seed

No text, template or tokenizer pass: the records are token ids already, drawn uniformly from the tokenizer's
vocabulary with a seeded generator (train, validation and test from different seeds). Speed and memory do not
depend on which tokens they are; a fixed length makes every micro-batch the same shape.
"""

from __future__ import annotations

import datasets
import numpy as np

from lightning_qpeft.core.tokens import IGNORE_INDEX

# records per split (train, validation, test): enough for 512 optimizer steps of 8
RECORDS = {"train": 4096, "validation": 64, "test": 64}


def random_token_records(n: int, source_len: int, target_len: int, vocab_size: int, seed: int,
                         train_on_source: bool) -> datasets.Dataset:
    """`n` tokenized records of `source_len + target_len` random ids in [0, vocab_size)."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, size=(n, source_len + target_len), dtype=np.int64)
    labels = ids.copy()
    if not train_on_source:
        labels[:, :source_len] = IGNORE_INDEX
    length = source_len + target_len
    supervised = (length - 1) if train_on_source else target_len  # the first position is never predicted
    # the columns collate.tokenize_records gives every tokenized record (batching and statistics read them)
    return datasets.Dataset.from_dict({
        "input_ids": ids, "labels": labels, "length": np.full(n, length, dtype=np.int64),
        "n_supervised": np.full(n, supervised, dtype=np.int64), "truncated": np.zeros(n, dtype=bool),
        "row": np.arange(1, n + 1, dtype=np.int64),
    })


def random_token_splits(vocab_size: int, source_len: int, target_len: int, train_on_source: bool,
                        seed: int) -> dict[str, datasets.Dataset]:
    """Train, validation and test splits (`RECORDS`), each from its own seed."""
    return {split: random_token_records(n, source_len, target_len, vocab_size, seed + i, train_on_source)
            for i, (split, n) in enumerate(RECORDS.items())}
