"""Crash safety end to end: a real `fit` process killed (SIGKILL) or preempted (SIGTERM), relaunched with the
same command and `--ckpt_path last`, ends where an unbroken run ends; no torn file ever sits at a checkpoint's
final path while it runs."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_qpeft.checkpointing import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30

# Lora dropout on: equal losses after a resume then also need the dropout RNG restored, not only the weights,
# optimizer, scheduler and data position. Every step's loss is flushed to the CSV as it is logged.
RUN_YAML = """
model:
  adapter:
    init_args: {{r: 16, lora_alpha: 32, lora_dropout: 0.1, target_modules: all-linear, task_type: CAUSAL_LM}}
data:
  batch_size: 8
trainer:
  max_steps: {steps}
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt}, every_n_train_steps: 3, save_last: true, save_top_k: -1}}
generation_metrics: {{test: false}}
adapter_export: {{dirpath: {adapter}}}
"""


def launch(run: Path, base: str, segment: int) -> subprocess.Popen:
    """The same command line for the first launch and every relaunch, as a job script would use."""
    config = run / "run.yaml"
    if not config.exists():
        config.write_text(RUN_YAML.format(steps=STEPS, ckpt=run / "ckpt", adapter=run / "adapter"))
    args = [sys.executable, "-m", "lightning_qpeft", "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--config", str(config), "--model.base_model", base, "--trainer.default_root_dir", str(run),
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run),
            "--trainer.logger.name", "logs", "--trainer.logger.version", f"segment{segment}",
            "--trainer.logger.flush_logs_every_n_steps", "1", "--ckpt_path", "last"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(run: Path) -> dict[int, float]:
    """train/loss by step over all segments; a later segment's value for a step replaces an earlier one's."""
    by_step: dict[int, float] = {}
    for segment in sorted((run / "logs").glob("segment*"), key=lambda p: int(p.name[7:])):
        with open(segment / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    by_step[int(row["step"])] = float(row["train/loss"])
    return by_step


class CheckpointWatcher(threading.Thread):
    """Loads every checkpoint file the moment it is seen at its final name: each must be whole."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.seen, self.torn, self.temporaries = folder, {}, [], set()
        self.running = True

    def run(self) -> None:
        while self.running:
            for path in list(self.folder.glob("*")) if self.folder.is_dir() else []:
                if path.name.endswith(".tmp"):
                    self.temporaries.add(path.name)
                    continue
                try:
                    stamp = path.stat().st_mtime_ns
                except FileNotFoundError:
                    continue
                if self.seen.get(path.name) == stamp:
                    continue
                try:
                    AtomicCheckpointIO().load_checkpoint(path)
                    self.seen[path.name] = stamp
                except FileNotFoundError:
                    pass
                except ValueError as e:
                    self.torn.append(f"{path.name}: {e}")
            time.sleep(0.005)


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def checkpoint_steps(run: Path) -> list[int]:
    """The steps of the periodic checkpoints written so far, from their names (the watcher loads the files)."""
    return [int(re.search(r"step=(\d+)", p.name).group(1)) for p in (run / "ckpt").glob("epoch=*-step=*.ckpt")]


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def unbroken(tiny_model_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("unbroken")
    out = finish(launch(run, tiny_model_dir, 0))
    assert "training starts from scratch" in out  # `--ckpt_path last` on a first launch
    return run


def assert_same_end(run: Path, unbroken: Path) -> None:
    ours, theirs = losses(run), losses(unbroken)
    assert sorted(theirs) == list(range(STEPS)), sorted(theirs)
    assert STEPS - 1 in ours
    for step, loss in ours.items():  # every step any segment logged, killed ones included
        assert loss == pytest.approx(theirs[step], rel=1e-5, abs=1e-6), step
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(unbroken / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    last = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS


@pytest.mark.slow
def test_sigkill_at_three_moments_then_resume_ends_as_an_unbroken_run(tiny_model_dir, unbroken, tmp_path):
    watcher = CheckpointWatcher(tmp_path / "ckpt")
    watcher.start()
    kills = []
    # 1: just after the first checkpoint appeared
    proc = launch(tmp_path, tiny_model_dir, 1)
    wait_for(proc, lambda: (tmp_path / "ckpt" / "last.ckpt").exists(), "the first checkpoint")
    proc.send_signal(signal.SIGKILL), proc.wait()
    kills.append(max(checkpoint_steps(tmp_path)))
    # 2: mid-step, a moment after a later checkpoint (its steps after that checkpoint are redone)
    proc = launch(tmp_path, tiny_model_dir, 2)
    wait_for(proc, lambda: max(checkpoint_steps(tmp_path), default=0) >= 12, "the step-12 checkpoint")
    time.sleep(0.15)
    proc.send_signal(signal.SIGKILL), proc.wait()
    kills.append(max(checkpoint_steps(tmp_path)))
    # 3: while a checkpoint is being written (a temporary file beside the folder's final names), or failing
    # that, when the step-21 checkpoint lands
    proc = launch(tmp_path, tiny_model_dir, 3)
    before = set(watcher.temporaries)
    wait_for(proc, lambda: watcher.temporaries - before or max(checkpoint_steps(tmp_path), default=0) >= 21,
             "a checkpoint write")
    proc.send_signal(signal.SIGKILL), proc.wait()
    kills.append(max(checkpoint_steps(tmp_path)))
    assert kills == sorted(kills) and kills[0] < kills[-1] < STEPS, kills
    assert not (tmp_path / "adapter").exists()  # killed runs never exported
    # every checkpoint left at a final name loads, before the last relaunch too
    for path in (tmp_path / "ckpt").glob("*.ckpt"):
        AtomicCheckpointIO().load_checkpoint(path)
    out = finish(launch(tmp_path, tiny_model_dir, 4))
    assert "Restoring states from the checkpoint" in out or "Restored all states" in out, out[-2000:]
    watcher.running = False
    watcher.join()
    assert not watcher.torn, watcher.torn
    assert len(watcher.seen) >= 5
    assert_same_end(tmp_path, unbroken)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_then_resume_ends_as_an_unbroken_run(tiny_model_dir, unbroken,
                                                                                   tmp_path):
    proc = launch(tmp_path, tiny_model_dir, 1)
    # step 4 is not a multiple of the checkpoint interval (3): what is saved is the preemption's own checkpoint
    wait_for(proc, lambda: max(checkpoint_steps(tmp_path), default=0) >= 3, "the step-3 checkpoint")
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM: a job script sees the run did not finish
    assert "SIGTERM: checkpoint saved to" in out, out[-3000:]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert saved > 3  # later than the periodic checkpoint: the work since it is kept
    finish(launch(tmp_path, tiny_model_dir, 2))
    assert_same_end(tmp_path, unbroken)
