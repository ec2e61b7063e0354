"""metrics.jsonl: every run with a logger writes its metrics there, whatever the logger; the study reads it."""

import json
from pathlib import Path

import pytest

from lightning_qpeft.callbacks.metrics_file import declared_directions, direction_of, read_metrics
from lightning_qpeft.cli import QPeftCLI
from lightning_qpeft.study.collect import collect_cell, higher_is_better, study_directions

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
    # directions: declared where the metrics are logged, written beside them, read back by the study
    directions = json.loads((log_dir / "metric_directions.json").read_text())
    assert directions["val/loss"] == "lower" and directions["perf/mfu"] == "higher"
    assert result["directions"] == directions
    declared = study_directions([result])
    for metric in metrics:
        if metric.startswith(("train/", "val/", "perf/tokens", "params/")):
            assert higher_is_better(metric, declared) is not None, metric


class _Owner:
    def __init__(self, directions):
        self.metric_directions = directions


class _Trainer:
    def __init__(self, *owners):
        self.lightning_module, self.datamodule, self.callbacks = owners[0], None, list(owners[1:])


def test_directions_are_merged_from_every_owner_and_patterns_lose_to_names():
    trainer = _Trainer(_Owner({"val/loss": "lower"}), _Owner({"mmlu/*": "higher", "mmlu/loss": "lower"}), object())
    declared = declared_directions(trainer)
    assert declared == {"val/loss": "lower", "mmlu/*": "higher", "mmlu/loss": "lower"}
    assert [direction_of(m, declared) for m in ("mmlu/accuracy", "mmlu/loss", "val/loss", "test/bleu")] == \
        ["higher", "lower", "lower", None]
    with pytest.raises(ValueError, match="metric_directions: .*each direction is higher or lower"):
        declared_directions(_Trainer(_Owner({"val/loss": "down"})))
