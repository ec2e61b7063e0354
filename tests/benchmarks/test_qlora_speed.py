"""benchmarks/qlora_speed.py: its presets are valid flags of the 7B config and state every speed switch; the
same-training check's reference gets the batching its variant's flags make."""

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import qlora_speed  # noqa: E402

SWITCHES = ("--model.compile", "--data.pad_to_multiple_of", "--data.group_by_length")


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
        assert model.compile_scope == flags["--model.compile_scope"]
    if "--data.group_by_length" in flags:
        assert data.group_by_length == (flags["--data.group_by_length"] == "true")


def test_batching_reads_the_config_then_the_flags():
    data = yaml.safe_load(qlora_speed.CONFIG.read_text())["data"]
    assert qlora_speed.batching([]) == {"group_by_length": data["group_by_length"],
                                        "pad_to_multiple_of": data["pad_to_multiple_of"]}
    assert qlora_speed.batching(qlora_speed.PRESETS["fused"]) == {"group_by_length": False, "pad_to_multiple_of": None}
    assert qlora_speed.batching(["--data.packing", "true", "--data.max_tokens", "4096"])["max_tokens"] == 4096
