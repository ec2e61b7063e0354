"""benchmarks/multi_gpu.py: every run kind's command is a valid `fit` on the 7B config (what the device runs)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import multi_gpu  # noqa: E402


@pytest.mark.parametrize("run", ["ddp:1", "ddp:2", "ddpc:2", "fsdp:2", "fsdp70b:2"])
def test_every_run_kind_instantiates_on_the_config(run, tmp_path, monkeypatch):
    from lightning_qpeft.cli import QPeftCLI

    monkeypatch.chdir(tmp_path)
    kind, n = run.split(":")
    cmd = multi_gpu.command(run, int(n), str(tmp_path / "tokenizer"), tmp_path / "root", 14)
    args = cmd[cmd.index("fit") + 1:]
    # the device's GPUs are not here: run the same flags on one CPU process (FSDP needs a GPU in Lightning)
    cli = QPeftCLI(args=[*args, "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy",
                         "auto"], run=False)
    model = cli.model
    assert model.base_model == multi_gpu.SHAPES[kind][0]
    assert model.use_compile == (kind == "ddpc") and not model.compile_dequantize
    assert cli.datamodule.batch_size == multi_gpu.SHAPES[kind][1]
    assert ("--trainer.strategy", "fsdp" if kind.startswith("fsdp") else ("ddp" if n != "1" else "auto")) in \
        zip(cmd, cmd[1:])
