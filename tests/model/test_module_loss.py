"""QPeftModule's loss on the batches the data module makes: packed rows and padded batches give the same
loss, and a batch without a supervised token gives 0, never NaN."""

import peft
import torch

from lightning_qpeft.data.collate import IGNORE_INDEX, PackCollator, PadCollator
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.model.module import QPeftModule


def module(tiny_model_dir):
    m = QPeftModule(tiny_model_dir, quantization="nf4", compute_dtype="float32",
                    adapter=peft.LoraConfig(r=4, target_modules="all-linear"))
    m.configure_model()
    return m


def test_a_batch_without_supervised_tokens_gives_zero_loss_not_nan(tiny_model_dir):
    m = module(tiny_model_dir)
    batch = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "labels": torch.full((1, 4), IGNORE_INDEX),
             "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    loss, n = m._step(batch)
    loss.backward()
    assert n == 0 and loss.item() == 0.0
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)
    batch["labels"][0, 2:] = batch["input_ids"][0, 2:]
    loss, n = m._step(batch)
    assert n == 2 and loss.item() > 0
    torch.testing.assert_close(loss, m(**batch).loss)  # otherwise the plain mean over supervised tokens


def test_packed_and_padded_steps_give_the_same_loss(tiny_model_dir, alpaca_file):
    dm = NLGDataModule(tiny_model_dir, task="file", path=alpaca_file, val_size=2)
    dm.setup("fit")
    recs = [dm.tokenized["train"][i] for i in range(6)]
    m = module(tiny_model_dir).eval()
    with torch.no_grad():
        padded, n_pad = m._step(PadCollator(dm.tokenizer.pad_token_id)(recs))
        packed, n_pack = m._step(PackCollator()(recs))
    assert n_pad == n_pack == sum(r["n_supervised"] for r in recs)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_rounding_the_padded_length_up_leaves_the_loss_alone(tiny_model_dir, alpaca_file):
    # data.pad_to_multiple_of only adds masked positions: same loss, same supervised count, longer rows
    dm = NLGDataModule(tiny_model_dir, task="file", path=alpaca_file, val_size=2)
    dm.setup("fit")
    recs = [dm.tokenized["train"][i] for i in range(5)]
    plain, rounded = PadCollator(dm.tokenizer.pad_token_id)(recs), PadCollator(dm.tokenizer.pad_token_id, 64)(recs)
    longest = max(len(r["input_ids"]) for r in recs)
    assert longest % 64 and rounded["input_ids"].shape == (5, -(-longest // 64) * 64)
    torch.manual_seed(0)
    m = module(tiny_model_dir).eval()
    with torch.no_grad():
        loss_plain, n_plain = m._step(plain)
        loss_rounded, n_rounded = m._step(rounded)
    assert n_plain == n_rounded == sum(r["n_supervised"] for r in recs)
    torch.testing.assert_close(loss_rounded, loss_plain, rtol=1e-5, atol=1e-5)


def test_packing_is_refused_for_prompt_learning_adapters(tiny_model_dir, alpaca_file):
    import pytest

    from tests.conftest import cpu_trainer

    m = QPeftModule(tiny_model_dir, quantization="none", compute_dtype="float32", dtype="float32",
                    adapter=peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    dm = NLGDataModule(tiny_model_dir, task="file", path=alpaca_file, val_size=2, packing=True)
    with pytest.raises(ValueError, match="model.adapter=prompt_tuning cannot run with data.packing=true"):
        cpu_trainer(max_steps=1, limit_val_batches=0).fit(m, dm)
