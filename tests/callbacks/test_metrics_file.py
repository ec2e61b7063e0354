"""metrics.jsonl: every run with a logger writes its metrics there, whatever the logger; the study reads it."""

import json
from pathlib import Path

from lightning_qpeft.callbacks.metrics_file import read_metrics
from lightning_qpeft.cli import QPeftCLI
from lightning_qpeft.study.collect import collect_cell

ROOT = Path(__file__).resolve().parents[2]


def test_a_csv_logged_run_writes_metrics_jsonl_and_the_study_reads_it(tiny_model_dir, tmp_path):
    root = tmp_path / "cell" / "run"
    QPeftCLI(args=["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
                   "--trainer.default_root_dir", str(root), "--trainer.max_steps", "6",
                   "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
                   "--trainer.enable_progress_bar", "false", "--data.max_train_records", "64", "--trainer.log_every_n_steps", "2",
                   "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                   "--trainer.logger.init_args.save_dir", str(root)])
    log_dir = next(root.rglob("metrics.csv")).parent  # CSVLogger's own file, beside ours
    metrics = read_metrics(log_dir / "metrics.jsonl")
    assert [s for s, _ in metrics["val/loss"]] == [2, 5]  # the two validations, at Lightning's steps
    assert "train/loss" in metrics and "params/trainable" in metrics
    result = collect_cell(tmp_path / "cell", 0)
    assert result["status"] == "done"
    assert result["metrics"]["val/loss"] == metrics["val/loss"][-1][1]
    assert json.loads((log_dir / "perf.json").read_text())["versions"]["torch"]
    assert result["versions"]["torch"]  # the study's result names the environment its figures come from
