"""The random-tokens task: fixed-length records of random ids, fully supervised or prompt-masked."""

import pytest
import torch

from lightning_qpeft.data.datamodule import NLGDataModule


def test_fixed_length_fully_supervised_batches(tiny_model_dir):
    data = NLGDataModule(tiny_model_dir, task="random-tokens", source_max_len=6, target_max_len=4,
                         train_on_source=True, batch_size=3, max_train_records=12)
    data.setup("fit")
    assert len(data.tokenized["train"]) == 12
    batches = list(data.train_dataloader())
    assert len(batches) == 4
    vocab = len(data.tokenizer)
    for b in batches:
        assert b["input_ids"].shape == (3, 10)
        assert torch.equal(b["labels"], b["input_ids"])  # as the peer's model(input_ids=x, labels=x)
        assert b["attention_mask"].all()
        assert 0 <= b["input_ids"].min() and b["input_ids"].max() < vocab
    # seeded: another module gives the same records
    again = NLGDataModule(tiny_model_dir, task="random-tokens", source_max_len=6, target_max_len=4,
                          train_on_source=True, max_train_records=12)
    again.setup("fit")
    assert again.tokenized["train"]["input_ids"] == data.tokenized["train"]["input_ids"]
    assert again.tokenized["validation"]["input_ids"] != data.tokenized["train"]["input_ids"][:64]


def test_source_is_masked_unless_trained_on(tiny_model_dir):
    data = NLGDataModule(tiny_model_dir, task="random-tokens", source_max_len=6, target_max_len=4, batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert (batch["labels"][:, :6] == -100).all()
    assert torch.equal(batch["labels"][:, 6:], batch["input_ids"][:, 6:])


def test_a_data_path_is_refused(tiny_model_dir, alpaca_file):
    with pytest.raises(ValueError, match="data.path: task 'random-tokens' makes its own records"):
        NLGDataModule(tiny_model_dir, task="random-tokens", path=alpaca_file)
