"""Reading a cell: TensorBoard scalars reduced to one number each, status and error classification."""

import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.study.collect import collect_cell, error_record, higher_is_better, reduce_scalars, study_directions


@pytest.mark.parametrize("error, status", [
    (ConfigError("model.adapter", "prefix tuning cannot run with model.gradient_checkpointing=true",
                 "set it to false"), "refused"),
    (type("SubError", (ConfigError,), {})("data.path", "no file"), "refused"),  # a subclass is a refusal too
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "failed"),
    (ValueError("model.adapter: worded like a refusal, raised as a plain ValueError"), "failed"),
])
def test_a_cell_is_refused_by_the_type_of_its_error_not_its_words(tmp_path, error, status):
    (tmp_path / "error.json").write_text(json.dumps(error_record(error)))
    res = collect_cell(tmp_path, 1)
    assert res["status"] == status
    assert res["error"] == f"{type(error).__name__}: {error}"


def test_metric_directions_are_the_declared_ones():
    declared = study_directions([{"directions": {"val/loss": "lower", "*/rougeL": "higher", "mmlu/*": "higher",
                                                 "mmlu/loss": "lower"}}, None])
    assert higher_is_better("val/loss", declared) is False and higher_is_better("test/rougeL", declared) is True
    assert higher_is_better("mmlu/accuracy", declared) is True and higher_is_better("mmlu/loss", declared) is False
    assert higher_is_better("wall_time_s", declared) is False  # the runner's own figure
    assert higher_is_better("perf/whatever", declared) is None  # undeclared: no guess from the name


def test_reduce_keeps_the_last_value_and_the_peak_memory_maximum():
    scalars = {"val/loss": [(10, 2.0), (20, 1.5), (20, 1.25)], "perf/peak_memory_gib": [(5, 3.0), (10, 5.0), (15, 4.0)],
               "epoch": [(20, 0.0)], "lr-AdamW": [(20, 1e-3)], "test/bleu": []}
    assert reduce_scalars(scalars) == {"val/loss": 1.25, "perf/peak_memory_gib": 5.0}


def write_run(cell_dir, scalars):
    log = cell_dir / "run" / "lightning_logs" / "version_0"
    with SummaryWriter(str(log)) as w:
        for tag, events in scalars.items():
            for step, value in events:
                w.add_scalar(tag, value, step)
    (log / "config.yaml").write_text("model:\n  quantization: nf4\n")
    (log / "adapter").mkdir()
    (log / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    return log


def test_collect_done_cell(tmp_path):
    log = write_run(tmp_path, {"val/loss": [(10, 2.0), (20, 1.5)], "params/trainable": [(0, 7168)]})
    (tmp_path / "process.json").write_text(json.dumps({"peak_cuda_gib": 1.5}))
    res = collect_cell(tmp_path, 0)
    assert res["status"] == "done" and res["error"] == ""
    # no adapter/size_bytes in the logs: measured from the exported folder instead
    assert res["metrics"] == {"val/loss": 1.5, "params/trainable": 7168.0, "adapter/size_bytes": 1000.0,
                              "peak_cuda_gib": 1.5}
    assert res["config"] == str(log / "config.yaml")


def test_collect_failed_and_refused_cells(tmp_path):
    write_run(tmp_path, {"val/loss": [(10, 2.0)]})
    (tmp_path / "output.log").write_text("Traceback (most recent call last):\n  ...\nValueError: model.adapter: no\n")
    (tmp_path / "error.json").write_text(json.dumps(error_record(ConfigError("model.adapter", "no"))))
    res = collect_cell(tmp_path, 1)
    assert (res["status"], res["error"]) == ("refused", "ConfigError: model.adapter: no")
    assert res["metrics"]["val/loss"] == 2.0  # what the run logged before it stopped is kept
    assert res["error_tail"].endswith("ValueError: model.adapter: no")

    # a parse error: jsonargparse printed the reason; the log's last error line is quoted
    (tmp_path / "output.log").write_text("usage: ...\nerror: Parser key \"model.quantisation\": unknown\n")
    (tmp_path / "error.json").write_text(json.dumps({"type": "SystemExit", "types": ["SystemExit"], "message": "x"}))
    assert collect_cell(tmp_path, 2)["status"] == "refused"
    assert collect_cell(tmp_path, 2)["error"] == 'SystemExit: error: Parser key "model.quantisation": unknown'

    (tmp_path / "error.json").unlink()  # no error.json: the process died without a Python exception
    assert collect_cell(tmp_path, -9)["error"] == "killed by signal 9 (out of memory?)"
    assert collect_cell(tmp_path, -11)["error"] == "killed by signal 11"
