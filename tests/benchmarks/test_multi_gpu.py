"""benchmarks/multi_gpu.py: every run kind's command is a valid `fit` on the 7B config (what the device runs)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import multi_gpu  # noqa: E402


@pytest.mark.parametrize("run", ["ddp:1", "ddp:2", "ddpc:2", "fsdp:2", "fsdpdev:2", "fsdp70b:2"])
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
    assert model.config.compile == (kind == "ddpc") and not model.config.compile_dequantize
    assert cli.datamodule.batch_size == multi_gpu.SHAPES[kind][1]
    assert ("--trainer.strategy", "fsdp" if kind.startswith("fsdp") else ("ddp" if n != "1" else "auto")) in \
        zip(cmd, cmd[1:])


def test_dev_kinds_build_on_the_gpu_and_the_table_compares_fsdp_with_ddp(tmp_path):
    cmd = multi_gpu.command("fsdpdev:2", 2, "tok", tmp_path, 14)
    assert ("--model.fsdp_load_on", "device") in zip(cmd, cmd[1:])
    assert "--model.fsdp_load_on" not in multi_gpu.command("fsdp:2", 2, "tok", tmp_path, 14)
    row = dict(resident_memory_gib_at_train_start=2.0, peak_memory_gib_at_train_start=3.0, peak_memory_gib=4.0,
               mfu=0.1, wall_s=60)
    results = [{"run": "ddp:1", "gpus": 1, "tokens_per_s": 1000.0, **row},
               {"run": "fsdp:2", "gpus": 2, "tokens_per_s": 500.0, **row},
               {"run": "fsdp70b:2", "gpus": 2, "tokens_per_s": 100.0, **row},
               {"run": "fsdpdev:2", "gpus": 2, "rc": 1, "wall_s": 9}]
    lines = multi_gpu.table(results).splitlines()
    assert lines[2] == "| ddp:1 | 1 | 1,000 | 1,000 | 1.00x | 2.00 | 3.00 | 4.00 | 0.100 | 60 |"
    assert lines[3] == "| fsdp:2 | 2 | 500 | 250 | 0.25x | 2.00 | 3.00 | 4.00 | 0.100 | 60 |"
    assert lines[4].startswith("| fsdp70b:2 | 2 | 100 | 50 | - |")
    assert lines[5] == "| fsdpdev:2 | 2 | failed (rc 1) | | | | | | | 9 |"
