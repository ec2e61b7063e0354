"""QPeftModule on the tiny 4-bit model: it learns, only the adapter changes, checkpoints resume, and the
exported adapter loads in plain peft with the same logits."""

import peft
import pytest
import torch

from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.model.module import QPeftModule
from lightning_qpeft.model.loading import load_base_model
from tests.conftest import cpu_trainer

LORA = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


def make(tiny_model_dir, quantization="nf4-dq", **kw):
    module = QPeftModule(tiny_model_dir, quantization=quantization, compute_dtype="float32", adapter=LORA,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), **kw)
    data = NLGDataModule(tiny_model_dir, source_max_len=96, target_max_len=48, batch_size=8, max_train_records=400)
    return module, data


def eval_loss(module, data):
    data.setup("fit")
    module.eval()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        return module(**batch).loss.item()


def test_only_adapter_parameters_train(tiny_model_dir):
    module, _ = make(tiny_model_dir)
    module.configure_model()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    module.configure_model()  # idempotent: the same model object stays
    assert [n for n, p in module.named_parameters() if p.requires_grad] == trainable


def test_fit_lowers_loss_changes_adapter_not_base(tiny_model_dir):
    module, data = make(tiny_model_dir)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    base_before = {n: b.detach().clone() for n, b in module.model.named_buffers()}
    loss0 = eval_loss(module, data)
    cpu_trainer(max_steps=30).fit(module, data)
    loss1 = eval_loss(module, data)
    assert loss1 < loss0 - 0.5, (loss0, loss1)
    changed = [n for n, p in module.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    for n, b in module.model.named_buffers():
        assert torch.equal(b, base_before[n]), n


def test_checkpoint_holds_trainable_tensors_only_and_resumes(tiny_model_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None, losses=None):
        module, data = make(tiny_model_dir)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=5, save_top_k=-1)
        recorder = LossRecorder()
        trainer = cpu_trainer(max_steps=max_steps, enable_checkpointing=True, callbacks=[ckpt, recorder],
                              limit_val_batches=0)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer, recorder.losses

    trainer, full = run(10)
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=5.ckpt", weights_only=True)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    assert sum(v.numel() for v in state["state_dict"].values()) < 50_000  # the adapter, not the base
    resumed_trainer, resumed = run(10, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=5.ckpt"))
    assert resumed_trainer.global_step == 10
    assert len(resumed) == 5
    assert resumed == pytest.approx(full[5:], rel=1e-5, abs=1e-6)


class LossRecorder(__import__("lightning").pytorch.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_exported_adapter_loads_in_plain_peft_with_same_logits(tiny_model_dir, tmp_path):
    from lightning_qpeft.callbacks import AdapterExport

    module, data = make(tiny_model_dir)
    export = AdapterExport(dirpath=str(tmp_path / "adapter"))
    cpu_trainer(max_steps=5, callbacks=[export], limit_val_batches=0).fit(module, data)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    batch = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        ours = module(**batch).logits
    base = load_base_model(tiny_model_dir, "nf4-dq", compute_dtype="float32")  # a fresh base
    plain = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # and the adapter did something: the bare base gives other logits
    with torch.no_grad():
        with plain.disable_adapter():
            assert not torch.allclose(plain(input_ids=batch["input_ids"]).logits, ours, atol=1e-3)


def test_checkpoint_of_another_adapter_is_refused(tiny_model_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, data = make(tiny_model_dir)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cpu_trainer(max_steps=2, enable_checkpointing=True, callbacks=[ckpt], limit_val_batches=0).fit(module, data)
    other = QPeftModule(tiny_model_dir, quantization="nf4-dq", compute_dtype="float32",
                        adapter=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    _, data2 = make(tiny_model_dir)
    with pytest.raises(ValueError, match=r"model.adapter.r: checkpoint 8 vs config 4"):
        cpu_trainer(max_steps=4, limit_val_batches=0).fit(other, data2, ckpt_path=str(tmp_path / "last.ckpt"))


def test_the_adapter_export_records_the_module_settings(tiny_model_dir):
    from lightning_qpeft.callbacks.adapter_export import training_info

    info = training_info(QPeftModule(tiny_model_dir, quantization="nf4", compute_dtype="float32"))
    assert {k: info[k] for k in ("base_model", "quantization", "compute_dtype", "quant_storage", "method")} == {
        "base_model": tiny_model_dir, "quantization": "nf4", "compute_dtype": "float32", "quant_storage": "auto",
        "method": "none"}
    assert (info["upcast_norms"], info["quantized_outputs"]) == (True, "input")  # what the activations ran in
