"""Fixtures of the model tests."""

import pytest

from lightning_qpeft.data.datamodule import NLGDataModule


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    """The first three training batches (4 records each) of the tiny model's default task."""
    data = NLGDataModule(tiny_model_dir, source_max_len=64, target_max_len=32, batch_size=4, max_train_records=32)
    data.setup("fit")
    return list(data.train_dataloader())[:3]
