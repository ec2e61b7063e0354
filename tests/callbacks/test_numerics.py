"""A NaN injected into training: the policy is applied and no checkpoint ever holds a non-finite tensor."""

import math
from contextlib import nullcontext

import peft
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qpeft.callbacks.numerics import NonFiniteError, NonFiniteGuard
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.model.module import QPeftModule
from tests.conftest import cpu_trainer


class PoisonedModule(QPeftModule):
    """Multiplies the loss of batch `poison_at` by NaN: its gradients are all NaN."""

    poison_at = 3

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if batch_idx == self.poison_at else loss


def run(tiny_model_dir, tmp_path, policy):
    module = PoisonedModule(tiny_model_dir, compute_dtype="float32",
                            adapter=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    data = NLGDataModule(tiny_model_dir, batch_size=4, max_train_records=100, source_max_len=64, target_max_len=32)
    guard = NonFiniteGuard(policy=policy)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = cpu_trainer(max_steps=6, callbacks=[guard, ckpt], enable_checkpointing=True, limit_val_batches=0)
    return module, guard, trainer, data


def assert_clean(path):
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and all(torch.isfinite(v).all() for v in state.values())


def test_skip_policy_drops_the_step_and_goes_on(tiny_model_dir, tmp_path):
    module, guard, trainer, data = run(tiny_model_dir, tmp_path, "skip")
    trainer.fit(module, data)
    assert guard.skipped == 1 and trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)
    for step in range(1, 7):
        assert_clean(tmp_path / f"epoch=0-step={step}.ckpt")
    # the poisoned step changed nothing: the checkpoints before and after it hold the same adapter
    before = torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "epoch=0-step=4.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stop_policy_raises_and_leaves_the_last_checkpoint_clean(tiny_model_dir, tmp_path):
    module, guard, trainer, data = run(tiny_model_dir, tmp_path, "stop")
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 3"):
        trainer.fit(module, data)
    assert sorted(p.name for p in tmp_path.glob("epoch=*.ckpt")) == [f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)]
    assert_clean(tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_non_finite_adapter_is_never_saved(tiny_model_dir):
    module = QPeftModule(tiny_model_dir, compute_dtype="float32",
                         adapter=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    module.configure_model()
    next(p for p in module.parameters() if p.requires_grad).data[0, 0] = math.inf
    with pytest.raises(FloatingPointError, match="non-finite tensors"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="nonfinite.policy: 'ignore'"):
        NonFiniteGuard(policy="ignore")


def test_a_non_finite_loss_with_finite_gradients_skips_the_step():
    """An inf loss need not reach the gradients (inf + a constant differentiates to finite values): the loss's
    flag, kept on the device between the backward and the optimizer step, must still skip the step."""
    from types import SimpleNamespace

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    trainer = SimpleNamespace(world_size=1, global_step=5)
    logged = {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.update({name: value}))
    guard = NonFiniteGuard(policy="skip")
    for loss_offset, skipped in ((0.0, 0), (math.inf, 1), (0.0, 1)):  # the flag resets after each step
        loss = (weight * 2).sum() + loss_offset
        guard.on_before_backward(trainer, module, loss)
        loss.backward()
        assert torch.isfinite(weight.grad).all()
        with pytest.warns(UserWarning, match="optimizer step skipped") if loss_offset else nullcontext():
            guard.on_before_optimizer_step(trainer, module, optimizer)
        assert guard.skipped == skipped
        assert (weight.grad is None) == bool(loss_offset)
        optimizer.zero_grad()
    assert logged == {"train/nonfinite_skips": 1.0}
