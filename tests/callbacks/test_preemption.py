"""SIGTERM during training: a checkpoint is saved whichever moment of the batch the signal lands in, and a
resume from it continues exactly as the unbroken run (dropout on, so the RNG must be restored too)."""

import os
import signal

import peft
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_qpeft.callbacks.preemption import PreemptionCheckpoint
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.model.module import QPeftModule
from tests.conftest import cpu_trainer

SIGNAL_AT = 4  # batch index


class SignalledModule(QPeftModule):
    """Sends itself SIGTERM during batch SIGNAL_AT: in training_step (before any on_train_batch_end) or in
    the module's on_train_batch_end (after every callback's: Lightning raises before PreemptionCheckpoint's
    hook runs again)."""

    moment = None

    def training_step(self, batch, batch_idx):
        if self.moment == "step" and batch_idx == SIGNAL_AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.moment == "after_callbacks" and batch_idx == SIGNAL_AT:
            os.kill(os.getpid(), signal.SIGTERM)


class Losses(Callback):
    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step] = outputs["loss"].item()


def run(tiny_model_dir, tmp_path, moment=None, ckpt_path=None):
    module = SignalledModule(tiny_model_dir, compute_dtype="float32",
                             adapter=peft.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"),
                             optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    module.moment = moment
    data = NLGDataModule(tiny_model_dir, batch_size=4, max_train_records=100, source_max_len=64, target_max_len=32)
    preemption, losses = PreemptionCheckpoint(), Losses()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=100)
    trainer = cpu_trainer(max_steps=10, callbacks=[preemption, ckpt, losses], enable_checkpointing=True,
                          limit_val_batches=0)
    torch.manual_seed(0)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return preemption, losses.by_step


@pytest.mark.parametrize("moment", ["step", "after_callbacks"])
def test_sigterm_saves_a_checkpoint_that_resumes_as_the_unbroken_run(tiny_model_dir, tmp_path, moment):
    _, unbroken = run(tiny_model_dir, tmp_path / "unbroken")
    with pytest.raises(SIGTERMException):
        run(tiny_model_dir, tmp_path / "stopped", moment)
    path = tmp_path / "stopped" / "last.ckpt"
    assert torch.load(path, weights_only=True)["global_step"] == SIGNAL_AT + 1  # the signalled batch is kept
    _, resumed = run(tiny_model_dir, tmp_path / "stopped", ckpt_path=str(path))
    assert sorted(resumed) == list(range(SIGNAL_AT + 2, 11))
    for step, loss in resumed.items():
        assert loss == pytest.approx(unbroken[step], rel=1e-5, abs=1e-6), step


def test_disabled_saves_nothing(tiny_model_dir, tmp_path):
    callback = PreemptionCheckpoint(enabled=False)

    class Trainer:
        received_sigterm, training = True, True

    callback.on_exception(Trainer(), None, SIGTERMException())
    assert callback.saved_to is None
