"""The CLI end to end on the tiny model: fit logs to TensorBoard, checkpoints, exports the adapter;
fit --ckpt_path resumes; predict writes JSON lines."""

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_qpeft.cli import QPeftCLI
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def scalars(log_dir) -> dict:
    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def tiny_args(tiny_model_dir, root, *extra):
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "20",
            "--trainer.val_check_interval", "10", "--trainer.enable_progress_bar", "false",
            "--data.max_train_records", "300", *extra]


def test_fit_logs_checkpoints_and_exports(tiny_model_dir, tmp_path):
    QPeftCLI(args=["fit", *tiny_args(tiny_model_dir, tmp_path)])
    version = tmp_path / "lightning_logs" / "version_0"
    logged = scalars(version)
    for tag in ("train/loss", "val/loss", "val/ppl", "lr-AdamW", "params/trainable", "params/total",
                "perf/tokens_per_s", "perf/peak_memory_gib"):  # efficiency: on by default
        assert tag in logged, tag
    val = [v for _, v in logged["val/loss"]]
    assert len(val) == 2 and val[1] < val[0]
    assert logged["params/trainable"][0][1] < logged["params/total"][0][1]
    assert (version / "adapter" / "adapter_config.json").exists()
    assert (version / "checkpoints" / "last.ckpt").exists()
    assert (version / "config.yaml").exists()
    assert json.loads((version / "perf.json").read_text())["measured_steps"] == 17  # 20 - 3 warm-up steps

    # resume from the last checkpoint and train 10 more steps
    QPeftCLI(args=["fit", *tiny_args(tiny_model_dir, tmp_path, "--trainer.max_steps", "30",
                                     "--ckpt_path", str(version / "checkpoints" / "last.ckpt"))])
    resumed = scalars(tmp_path / "lightning_logs" / "version_1")
    assert [s for s, _ in resumed["val/loss"]] == [29]  # continued from step 20, validated at 30


def test_predict_writes_jsonl(tiny_model_dir, tmp_path):
    records = [{"instruction": "Describe the venue.", "input": "name[Zizzi], food[Italian]", "output": "x"},
               {"instruction": "Describe the venue.", "input": "name[Aromi], area[riverside]", "output": "y"},
               {"instruction": "Say hi.", "output": "hi"}]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    out = tmp_path / "pred.jsonl"
    QPeftCLI(args=["predict", *tiny_args(tiny_model_dir, tmp_path), "--data.predict_path", path,
                   "--prediction_writer.path", str(out), "--model.generation.max_new_tokens", "8"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == [r.get("input", "") for r in records]
    assert all(isinstance(r["prediction"], str) and "prompt" in r for r in rows)
    assert rows[0]["prompt"].endswith("### Response: ")
