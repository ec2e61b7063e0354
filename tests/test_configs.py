"""Every YAML under configs/ parses and instantiates; a misspelled key fails naming it."""

import re
from pathlib import Path

import pytest

from lightning_qpeft.cli import QPeftCLI
from lightning_qpeft.model.adapters import adapter_to_dict

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
ADAPTER_CONFIGS = sorted((ROOT / "configs" / "adapter").glob("*.yaml"))
# run configs one folder down (configs/<model>/*.yaml, configs/study/base/*.yaml); study specs have their own test
MODEL_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                       if p.parent.name not in ("adapter", "study") and p.parent != ROOT / "configs")


def overlaid(config: Path) -> list[str]:
    """`--config` arguments that run `config`: an overlay (its header says `# Overlay of: BASE`) after its base."""
    base = re.search(r"^# Overlay of: (\S+)$", config.read_text(encoding="utf-8"), flags=re.M)
    return (["--config", str(ROOT / base.group(1))] if base else []) + ["--config", str(config)]


def test_there_are_configs():
    assert RUN_CONFIGS and ADAPTER_CONFIGS


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_instantiates(config, tiny_model_dir):
    cli = QPeftCLI(args=[*overlaid(config), "--model.base_model", tiny_model_dir,
                         "--trainer.logger", "false"], run=False)
    assert cli.model.base_model == tiny_model_dir
    assert cli.datamodule.tokenizer_name == tiny_model_dir  # linked from model.base_model


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_model_config_instantiates(config, tiny_model_dir, alpaca_file):
    cli = QPeftCLI(args=["--config", str(config), "--model.base_model", tiny_model_dir, "--data.path", alpaca_file,
                         "--trainer.logger", "false", "--trainer.accelerator", "cpu"], run=False)  # GPU configs too
    assert cli.model.base_model == tiny_model_dir and cli.datamodule.path == alpaca_file


@pytest.mark.parametrize("adapter", ADAPTER_CONFIGS, ids=lambda p: p.name)
def test_adapter_config_instantiates(adapter, tiny_model_dir):
    import peft

    from lightning_qpeft.model import compat

    # on a quantization the compatibility table allows for this method (the others are refused by design)
    row = compat.METHODS[adapter.stem]
    allowed = [q for q in compat.QUANT_COLUMNS if row.cell(q).status is not compat.Status.REFUSED]
    if not allowed:
        # kept as a config so that a user who asks for it gets the measured reason, not "unknown file"
        with pytest.raises(ValueError, match=f"model.adapter={row.name} cannot run with model.quantization=nf4"):
            QPeftCLI(args=["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
                           "--model.adapter", str(adapter), "--model.quantization", "nf4",
                           "--trainer.logger", "false"], run=False)
        return
    mode = allowed[0]
    cli = QPeftCLI(args=["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
                         "--model.adapter", str(adapter), "--model.quantization", mode,
                         "--model.dtype", "float32",
                         "--trainer.logger", "false"], run=False)
    assert isinstance(cli.model.adapter, (peft.PeftConfig,)) or type(cli.model.adapter).__name__ == "FullFineTuning"
    assert compat.lookup(cli.model.adapter)[1] is compat.METHODS[row.alias_of or row.name]
    # jsonargparse keeps init_args of the previous class (tiny.yaml's LoRA) that the new class also has:
    # the YAML must state those, or e.g. LoRA's r=16 would land in OFTConfig.r
    alone = compat.load_method_config(row, base_model=tiny_model_dir)
    assert adapter_to_dict(cli.model.adapter) == adapter_to_dict(alone)


def test_an_overlay_changes_only_its_own_keys(tiny_model_dir):
    """configs/tiny-mmlu.yaml over configs/tiny.yaml: the overlay's keys win, every other key is tiny.yaml's."""
    overlay = ROOT / "configs" / "tiny-mmlu.yaml"
    assert overlaid(overlay)[:2] == ["--config", str(ROOT / "configs" / "tiny.yaml")]
    args = ["--model.base_model", tiny_model_dir, "--trainer.logger", "false"]
    base = QPeftCLI(args=["--config", str(ROOT / "configs" / "tiny.yaml"), *args], run=False)
    cli = QPeftCLI(args=[*overlaid(overlay), *args], run=False)
    assert (cli.datamodule.task, cli.datamodule.template_name, cli.datamodule.target_max_len,
            cli.datamodule.batch_size) == ("synthetic-mc", "plain", 2, 32)
    assert cli.config.mmlu.enabled and cli.config.mmlu.source == "synthetic"
    assert cli.config.model.optimizer.init_args.lr == 0.001 != base.config.model.optimizer.init_args.lr
    assert adapter_to_dict(cli.model.adapter) == adapter_to_dict(base.model.adapter)  # tiny.yaml's LoRA
    for key in ("quantization", "compute_dtype", "gradient_checkpointing", "lr_scheduler"):
        assert cli.config.model[key] == base.config.model[key], key
    assert cli.config.trainer == base.config.trainer


def test_print_config_shows_resolved_config(capsys):
    with pytest.raises(SystemExit) as e:
        QPeftCLI(args=["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "quantization: nf4-dq" in out and "class_path: peft.LoraConfig" in out


@pytest.mark.parametrize("args, key", [
    (["--model.quantisation", "nf4"], "quantisation"),
    (["--data.batchsize", "4"], "batchsize"),
    (["--model.adapter.init_args.rr", "4"], "rr"),
])
def test_misspelled_key_fails_naming_it(args, key, capsys):
    with pytest.raises(SystemExit) as e:
        QPeftCLI(args=["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), *args])
    assert e.value.code != 0
    assert key in capsys.readouterr().err


def test_misspelled_key_in_a_config_file_fails_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("gradient_checkpointing:", "grad_checkpointing:"))
    with pytest.raises(SystemExit):
        QPeftCLI(args=["fit", "--config", str(bad)])
    assert "grad_checkpointing" in capsys.readouterr().err


def test_unknown_quantization_mode_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="model.quantization: unknown mode 'nf2'"):
        QPeftCLI(args=["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
                       "--model.quantization", "nf2"], run=False)


class _UniqueKeyLoader(__import__("yaml").SafeLoader):
    """PyYAML keeps the last of two equal keys silently; this loader refuses them."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_has_unique_keys(config):
    import yaml

    yaml.load(config.read_text(), Loader=_UniqueKeyLoader)


def test_the_unique_key_loader_refuses_a_duplicate():
    import yaml

    with pytest.raises(ValueError, match="duplicate key 'a' at line 3"):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=_UniqueKeyLoader)
