"""A failed run leaves nothing half-made (`failed_runs.py`): a run that fails before training removes the version
folder it made, so the next run gets its number, and one that fails after it started keeps its logs.
`--ckpt_path last` passes over a torn last.ckpt for the newest intact checkpoint, with a warning, and refuses
when none is intact (`cli.find_last_checkpoint`, `checkpointing.checkpoint_problem`).

The runs use the real command line in-process.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lightning_qpeft.checkpointing import checkpoint_problem
from lightning_qpeft.cli import main
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


class FailAtStep(Callback):
    """Fails the run after its second training batch (a crash once training has started)."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= 2:
            raise RuntimeError("failing on purpose after step 2")


def args(tiny: str, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny,
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", "--generation_metrics.test",
            "false", "--data.max_train_records", "64", "--trainer.max_steps", "4", *extra]


def versions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "lightning_logs").iterdir())


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished run (version_0) with last.ckpt and the best step checkpoint."""
    root = tmp_path_factory.mktemp("failed-runs")
    main(args(tiny_model_dir, root))
    assert versions(root) == ["version_0"]
    return root


def bad_jsonl(root: Path) -> list[str]:
    path = root / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    return ["--data.task", "alpaca", "--data.path", str(path)]


# (kind, extra arguments, regex of the failure): each fails after the logger made its folder, before training
FAILURES = [
    ("a data file that does not parse", bad_jsonl, r"cannot parse .*bad.jsonl:2"),
    ("a resume on other batches",
     lambda root: ["--data.batch_size", "8",
                   "--ckpt_path", str(root / "lightning_logs/version_0/checkpoints/last.ckpt")],
     r"data.batch_size: checkpoint 16 vs this run 8"),
    ("a checkpoint of another adapter",
     lambda root: ["--model.adapter.init_args.r", "4",
                   "--ckpt_path", str(root / "lightning_logs/version_0/checkpoints/last.ckpt")],
     r"model.adapter.r: checkpoint 16 vs config 4"),
]


@pytest.mark.parametrize("kind, extra, match", FAILURES, ids=[f[0] for f in FAILURES])
def test_a_run_that_fails_before_training_leaves_no_version_folder(run, tiny_model_dir, kind, extra, match):
    with pytest.raises(Exception, match=match):
        main(args(tiny_model_dir, run, *extra(run)))
    assert versions(run) == ["version_0"]


def test_the_next_run_reuses_the_number_and_a_run_failing_while_training_keeps_its_logs(tiny_model_dir, tmp_path):
    with pytest.raises(Exception, match="cannot parse"):
        main(args(tiny_model_dir, tmp_path, *bad_jsonl(tmp_path)))
    assert not (tmp_path / "lightning_logs").exists() or versions(tmp_path) == []
    with pytest.raises(RuntimeError, match="failing on purpose"):
        main(args(tiny_model_dir, tmp_path, "--trainer.callbacks+=tests.test_failed_runs.FailAtStep"))
    assert versions(tmp_path) == ["version_0"]  # the number the failed run had; kept: it trained
    assert any((tmp_path / "lightning_logs" / "version_0").glob("events.out.tfevents.*"))


def tear(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy or a disk that stopped half-way


def test_ckpt_path_last_passes_over_a_torn_last_checkpoint(run, tiny_model_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run, root)
    checkpoints = root / "lightning_logs" / "version_0" / "checkpoints"
    best = next(p for p in checkpoints.glob("step*.ckpt"))
    tear(checkpoints / "last.ckpt")
    assert checkpoint_problem(checkpoints / "last.ckpt") and checkpoint_problem(best) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(args(tiny_model_dir, root, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    said = [str(w.message) for w in caught if str(w.message).startswith("ckpt_path=last")]
    assert said and re.search(rf"last.ckpt is torn \(.+\); resuming from .*{best.name}, the newest intact checkpoint",
                              said[0]), said
    resumed = torch.load(root / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6


def test_ckpt_path_last_refuses_when_no_checkpoint_is_intact(run, tiny_model_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run, root)
    for ckpt in (root / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"):
        tear(ckpt)
    with pytest.raises(ValueError, match=r"ckpt_path=last: .*last.ckpt is torn \(.+\) and no other checkpoint under "
                                         r".* is intact; pass --ckpt_path FILE"):
        main(args(tiny_model_dir, root, "--ckpt_path", "last"))
    assert versions(root) == ["version_0"]


def test_checkpoint_problem_finds_a_changed_byte(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"w": torch.ones(4), "step": 3}, path)
    assert checkpoint_problem(path) is None
    data = bytearray(path.read_bytes())
    data[data.index(b"PK\x03\x04") + 80] ^= 0xFF  # inside the first member, the pickle
    path.write_bytes(bytes(data))
    assert "Bad CRC-32" in checkpoint_problem(path)
    write_jsonl(tmp_path / "not.ckpt", [{"a": 1}])
    assert checkpoint_problem(tmp_path / "not.ckpt") == "File is not a zip file"
