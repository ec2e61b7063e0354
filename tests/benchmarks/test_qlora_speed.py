"""benchmarks/qlora_speed.py: its presets are valid flags of the 7B config and state every speed switch; the
same-training check's reference gets the batching its variant's flags make."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import qlora_speed  # noqa: E402

SWITCHES = ("--model.compile", "--data.pad_to_multiple_of", "--data.group_by_length", "--model.optimizer",
            "--model.compile_dequantize")


@pytest.mark.parametrize("name", sorted(set(qlora_speed.PRESETS) - {"default"}))
def test_every_preset_states_the_switches_the_config_sets(name):
    flags = qlora_speed.PRESETS[name]
    assert all(s in flags for s in SWITCHES), f"{name} leaves one of {SWITCHES} to the config's default"


@pytest.mark.parametrize("name", sorted(qlora_speed.PRESETS))
def test_every_preset_parses_and_instantiates_on_the_config(name, tmp_path, monkeypatch):
    from lightning_qpeft.cli import QPeftCLI

    monkeypatch.chdir(tmp_path)  # nothing written into the repository
    cli = QPeftCLI(args=["--config", str(qlora_speed.CONFIG), "--data.path", str(tmp_path / "d.json"),
                         "--trainer.accelerator", "cpu", *qlora_speed.PRESETS[name]], run=False)
    model, data = cli.model, cli.datamodule
    flags = dict(zip(qlora_speed.PRESETS[name][::2], qlora_speed.PRESETS[name][1::2]))
    if "--model.compile_scope" in flags:
        assert model.config.compile_scope == flags["--model.compile_scope"]
    if "--data.group_by_length" in flags:
        assert data.group_by_length == (flags["--data.group_by_length"] == "true")
    if "--model.compile_dequantize" in flags:
        assert model.config.compile_dequantize == (flags["--model.compile_dequantize"] == "true")
    optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    stated = flags.get("--model.optimizer")
    spec = yaml.safe_load(stated) if stated else yaml.safe_load(qlora_speed.CONFIG.read_text())["model"]["optimizer"]
    module, _, name = spec["class_path"].rpartition(".")
    assert type(optimizer) is getattr(importlib.import_module(module), name)
    assert optimizer.defaults["lr"] == 2e-4 and optimizer.defaults["weight_decay"] == 0.0
    assert optimizer.defaults.get("foreach") == spec["init_args"].get("foreach")  # torch's: True; paged: absent


def test_batching_reads_the_config_then_the_flags():
    data = yaml.safe_load(qlora_speed.CONFIG.read_text())["data"]
    assert qlora_speed.batching([]) == {"group_by_length": data["group_by_length"],
                                        "pad_to_multiple_of": data["pad_to_multiple_of"]}
    assert qlora_speed.batching(qlora_speed.PRESETS["fused"]) == {"group_by_length": False, "pad_to_multiple_of": None}
    assert qlora_speed.batching(["--data.packing", "true", "--data.max_tokens", "4096"])["max_tokens"] == 4096


def test_same_training_is_judged_against_the_fp32_training():
    # call K's figures: our compiled run 0.9836 from the peer's update, but both exactly as far from fp32's
    check = {"max_abs_loss_diff": 0.0011, "losses_pass": True, "adapter_update_cosine": 0.9836, "pass": False,
             "tensors_mismatched": []}
    peer, ours = {"adapter_update_cosine": 0.970944}, {"adapter_update_cosine": 0.970937}
    verdict = qlora_speed.against_fp32(check, ours, peer)
    assert verdict["pass"] and verdict["cosine_to_fp32"] == 0.970937 and verdict["adapter_update_cosine"] == 0.9836
    assert not qlora_speed.against_fp32(check, {"adapter_update_cosine": 0.9650}, peer)["pass"]  # 0.0059 further
    assert not qlora_speed.against_fp32({**check, "losses_pass": False}, ours, peer)["pass"]
    alone = qlora_speed.against_fp32(check, ours, {})  # no fp32 run: compare's own verdict stands, and says so
    assert alone["pass"] is False and "no fp32 run" in alone["criterion"]


@pytest.mark.parametrize("name", sorted(qlora_speed.SMALL_PRESETS))
def test_every_small_preset_parses_and_instantiates_on_the_smollm2_config(name, tiny_model_dir, tmp_path, monkeypatch):
    from lightning_qpeft.cli import QPeftCLI

    monkeypatch.chdir(tmp_path)
    flags = qlora_speed.SMALL_PRESETS[name]
    cli = QPeftCLI(args=["--config", str(qlora_speed.SMALL_CONFIG), "--model.base_model", tiny_model_dir,
                         "--data.task", "alpaca", "--data.path", str(tmp_path / "d.json"),
                         "--trainer.accelerator", "cpu", *flags], run=False)
    for flag, value in zip(flags[::2], flags[1::2]):
        key = flag.removeprefix("--model.")
        if hasattr(cli.model.config, key):  # the run configuration the plan is resolved from
            assert str(getattr(cli.model.config, key)).lower() == value, flag
