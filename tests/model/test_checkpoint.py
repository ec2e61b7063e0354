"""The checkpoint object: a checkpoint keeps the trainable tensors and what they belong to, refuses non-finite
tensors on the way out and another base or adapter on the way in (naming what differs), and restores the random
generators once, when training starts again."""

import random

import pytest
import torch

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.model.checkpoint import CheckpointContent, clean_name, differences, trainable_names

IDENTITY = {"base_model": "tiny", "quantization": "nf4", "adapter": {"r": 8, "revision": None}}
NAMES = ["model.a.lora_A", "model.a.lora_B"]


def checkpoint():
    return {"state_dict": {"model.a.lora_A": torch.ones(2), "model.a.lora_B": torch.zeros(2),
                           "model.a.base": torch.ones(3)}}


def test_save_keeps_trainable_tensors_and_records_what_they_belong_to():
    ckpt = checkpoint()
    CheckpointContent().save(ckpt, IDENTITY, NAMES)
    assert sorted(ckpt["state_dict"]) == NAMES  # the base is reloaded, never saved
    assert ckpt["qpeft"] == {**IDENTITY, "tensors": NAMES}
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}


def test_save_refuses_non_finite_tensors():
    ckpt = checkpoint()
    ckpt["state_dict"]["model.a.lora_B"] = torch.tensor([1.0, float("nan")])
    with pytest.raises(FloatingPointError, match=r"non-finite tensors: \['model.a.lora_B'\]"):
        CheckpointContent().save(ckpt, IDENTITY, NAMES)


def test_load_refuses_another_base_or_adapter_naming_what_differs():
    ckpt = checkpoint()
    CheckpointContent().save(ckpt, IDENTITY, NAMES)
    other = {**IDENTITY, "quantization": "int8", "adapter": {"r": 16, "revision": "x"}}  # revision is not compared
    assert differences(ckpt["qpeft"], other, NAMES[:1]) == [
        "quantization: checkpoint 'nf4' vs config 'int8'", "model.adapter.r: checkpoint 8 vs config 16",
        "trainable tensors differ (missing [], unexpected ['model.a.lora_B'])"]
    with pytest.raises(ConfigError, match="ckpt_path: the checkpoint does not match this configuration:\n  quantiz"):
        CheckpointContent().load(ckpt, other, NAMES)
    with pytest.raises(ConfigError, match=r"ckpt_path: not a lightning_qpeft checkpoint \(no 'qpeft' entry\)"):
        CheckpointContent().load({"state_dict": {}}, IDENTITY, NAMES)


def test_generators_are_restored_once_when_training_starts():
    ckpt = checkpoint()
    random.seed(1)
    CheckpointContent().save(ckpt, IDENTITY, NAMES)
    expected = random.random()
    content = CheckpointContent()
    content.load(ckpt, IDENTITY, NAMES)
    random.seed(2)  # what runs between loading and training draws from its own state
    content.restore_rng()
    assert random.random() == expected and content.rng_to_restore is None
    content.restore_rng()  # once only: nothing more to restore


def test_trainable_names_drop_wrapper_prefixes():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    module[0].requires_grad_(False)
    assert trainable_names(module) == ["1.bias", "1.weight"]
    assert clean_name("model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.w") == "model.layers.0.w"
