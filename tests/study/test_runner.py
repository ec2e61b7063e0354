"""The runner end to end on the tiny test model: each cell in its own process, a stopped study and a killed
cell resumed, nothing rerun once every cell is finished, refused and failed cells recorded while the study
goes on, and results.csv holding the TensorBoard logs' own numbers.

Cell processes cost ~10 s of imports each here, so one study (two processes) serves the end-to-end tests;
process handling (failure, timeout, signals) is tested with a stand-in interpreter that imports nothing, and
the cell's own error records in-process."""

import csv
import json
import os
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_qpeft.study.collect import collect_cell
from lightning_qpeft.study.config import StudySpec
from lightning_qpeft.study.report import write_reports
from lightning_qpeft.study.runner import StudyRunner

ROOT = Path(__file__).resolve().parents[2]


def mini_spec(model_dir: str, out: Path) -> StudySpec:
    return StudySpec(
        name="mini", base_config=str(ROOT / "configs" / "tiny.yaml"), output_dir=str(out),
        axes={"model.quantization": ["none", "nf2", "nf4"],  # nf2: refused, and the study goes on
              "model.adapter": {"lora": str(ROOT / "configs" / "adapter" / "lora.yaml")}},
        args=["--model.base_model", model_dir, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
              "--data.max_train_records", "64", "--data.batch_size", "4", "--trainer.limit_val_batches", "1",
              "--trainer.limit_test_batches", "1"],
        evaluate=["test"], report={"baseline": "none", "metrics": ["val/loss", "test/loss"], "bars": ["val/loss"]})


def tracked(runner: StudyRunner) -> list:
    """Record which cells get a process."""
    launched, launch = [], runner.launch

    def spy(cdir, *args):
        launched.append(cdir.name)
        return launch(cdir, *args)

    runner.launch = spy
    return launched


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    spec = mini_spec(tiny_model_dir, out)
    state = {"out": out, "spec": spec}
    ids = [c.id for c in StudyRunner(spec).cells]
    state["ids"] = dict(zip(["none", "nf2", "nf4"], ids))

    # 1) stopped after the first cell (as if interrupted between cells)
    first = StudyRunner(spec, max_cells=1, log=lambda s: None, report=write_reports)
    state["launched_1"] = tracked(first)
    state["results_1"] = first.run()
    done = out / "cells" / ids[0] / "result.json"
    state["mtime_done"] = done.stat().st_mtime_ns

    # 2) the second cell killed mid-run: a half-written run folder, no result.json
    half = out / "cells" / ids[2]
    (half / "run" / "lightning_logs" / "version_0").mkdir(parents=True)
    (half / "run" / "lightning_logs" / "version_0" / "events.out.tfevents.0.killed").write_bytes(b"\x00garbage")
    (half / "output.log").write_text("Epoch 0: half way\n")

    second = StudyRunner(spec, log=lambda s: None, report=write_reports)
    state["launched_2"] = tracked(second)
    state["results_2"] = second.run()
    state["mtime_done_after"] = done.stat().st_mtime_ns

    # 3) everything finished: a third invocation starts no process
    third = StudyRunner(spec, log=state.setdefault("log_3", []).append, report=write_reports)
    third.launch = lambda cdir, *a: pytest.fail(f"finished cell {cdir.name} was run again")
    t0 = time.perf_counter()
    state["results_3"] = third.run()
    state["seconds_3"] = time.perf_counter() - t0
    state["runner"] = third
    return state


def test_stopped_study_ran_only_the_first_cell(study):
    ids = study["ids"]
    assert study["launched_1"] == [ids["none"]]
    assert [r is not None for r in study["results_1"]] == [True, False, False]


def test_rerun_completes_only_the_missing_cells(study):
    ids = study["ids"]
    # the refused cell costs no process: the precheck refused it in the study's own process
    assert study["launched_2"] == [ids["nf4"]]
    assert study["mtime_done_after"] == study["mtime_done"]  # the finished cell was not touched
    half = study["out"] / "cells" / ids["nf4"] / "run" / "lightning_logs"
    assert [p.name for p in half.iterdir()] == ["version_0"]
    assert not list(half.rglob("*.killed"))  # the killed run's files were cleared before the rerun
    assert [r["status"] for r in study["results_2"]] == ["done", "refused", "done"]


def test_finished_study_runs_nothing(study):
    assert study["seconds_3"] < 15
    assert "running 0" in study["log_3"][0]
    assert [r["status"] for r in study["results_3"]] == ["done", "refused", "done"]


def test_refused_cell_records_why(study):
    refused = study["results_3"][1]
    assert refused["error"] == ("model.quantization: unknown mode 'nf2'; choose one of none, nf4, nf4-dq, fp4, "
                                "fp4-dq, int8")
    assert "wall_time_s" not in refused["metrics"]  # it never ran


def test_outputs(study):
    out = study["out"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows] == ["done", "refused", "done"]
    assert rows[1]["error"].startswith("model.quantization: unknown mode 'nf2'")
    report = (out / "report.md").read_text()
    assert "| model.quantization | lora |" in report
    assert "| nf2 | refused |" in report and "- nf4: val/loss" in report
    for plot in ("quality_vs_memory", "quality_vs_throughput", "bar_val_loss"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    # the HPARAMS view: one run per cell, with its labels and metrics
    acc = EventAccumulator(str(out / "tb" / study["ids"]["nf4"]))
    acc.Reload()
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")
    assert "val/loss" in acc.Tags()["scalars"]


def test_results_csv_holds_the_tensorboard_numbers(study):
    cell = study["ids"]["nf4"]
    row = next(r for r in csv.DictReader(open(study["out"] / "results.csv")) if r["cell"] == cell)
    version = study["out"] / "cells" / cell / "run" / "lightning_logs" / "version_0"
    acc = EventAccumulator(str(version), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("val/loss", "val/ppl", "test/loss", "params/trainable", "params/total", "adapter/size_bytes"):
        assert float(row[tag]) == acc.Scalars(tag)[-1].value, tag
    assert len(acc.Scalars("val/loss")) == 2  # the last of two validations is the one reported
    assert row["config"] == str(version / "config.yaml")
    assert "quantization: nf4" in Path(row["config"]).read_text()
    assert 0.1 < float(row["peak_rss_gib"]) < 8 and float(row["wall_time_s"]) > 1


def test_rerun_failed_selects_failed_and_refused(study):
    runner = StudyRunner(study["spec"], rerun="failed")
    assert [c.id for c in runner.pending()] == [study["ids"]["nf2"]]
    assert len(StudyRunner(study["spec"], rerun="all").pending()) == 3


def fake_python(tmp_path: Path, body: str) -> str:
    """A stand-in interpreter for the cell process (imports nothing)."""
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("body, timeout, error", [
    ("sleep 30", 1.0, "timed out after 1 s"),
    ("kill -9 $$", None, "killed by signal 9 (out of memory?)"),
    ("echo 'RuntimeError: CUDA error: an illegal memory access' >&2; exit 3", None,
     "RuntimeError: CUDA error: an illegal memory access"),
])
def test_process_failures_are_recorded(tmp_path, body, timeout, error):
    spec = StudySpec(base_config="configs/tiny.yaml", axes={"model.quantization": ["nf4"]},
                     output_dir=str(tmp_path / "s"), cell_timeout_s=timeout)
    runner = StudyRunner(spec, precheck=False, python=fake_python(tmp_path, body), log=lambda s: None)
    t0 = time.perf_counter()
    (res,) = runner.run()
    assert time.perf_counter() - t0 < 20
    assert res["status"] == "failed" and res["error"] == error
    assert json.loads((runner.cell_dir(runner.cells[0]) / "result.json").read_text())["status"] == "failed"


def test_study_goes_on_after_a_failed_cell(tmp_path):
    spec = StudySpec(base_config="configs/tiny.yaml", axes={"model.quantization": ["nf4", "int8"]},
                     output_dir=str(tmp_path / "s"))
    # the stand-in fails the nf4 cell and "finishes" the int8 one (which then has no metrics)
    python = fake_python(tmp_path, 'case "$3" in */nf4-*) echo "boom" >&2; exit 1;; esac; exit 0')
    results = StudyRunner(spec, precheck=False, python=python, log=lambda s: None, report=write_reports).run()
    assert [(r["status"], r["error"]) for r in results] == [("failed", "boom"), ("done", "")]
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert [(r["status"], r["error"], r["val/loss"]) for r in rows] == [("failed", "boom", ""), ("done", "", "")]


@pytest.mark.parametrize("extra, status, error", [
    # a refusal that only shows once the model is built, classified from the cell's error.json
    (["--model.adapter", "null"], "refused", "ConfigError: model.adapter: none leaves nothing to train"),
    # any other exception: failed, with its message (an out-of-range number is refused as the config is parsed:
    # torch's own check of a combination is raised while running)
    (["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.nesterov", "true"], "failed",
     "ValueError: Nesterov momentum requires a momentum and zero dampening"),
])
def test_cell_records_errors_raised_while_running(tiny_model_dir, tmp_path, extra, status, error):
    from lightning_qpeft.study.cell import main as cell_main

    cdir = tmp_path / "cell"
    cdir.mkdir()
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
            "--trainer.default_root_dir", str(cdir / "run"), "--trainer.enable_progress_bar", "false",
            "--trainer.max_steps", "1", *extra]
    (cdir / "cell.json").write_text(json.dumps({"args": args, "evaluate": []}))
    with pytest.raises(ValueError):
        cell_main([str(cdir / "cell.json")])
    res = collect_cell(cdir, returncode=1)
    assert res["status"] == status
    assert res["error"].startswith(error)


def test_precheck_accepts_every_shipped_study_cell(tiny_model_dir):
    """The study configs' cells instantiate (tiny model; GPU studies on the CPU accelerator)."""
    from lightning_qpeft.study.cli import build_parser

    parser = build_parser()
    for name, n in (("tiny", 4), ("tiny-seeds", 1), ("device-efficiency", 3), ("qlora-table4", 2)):
        raw = parser.parse_args(["--config", str(ROOT / "configs" / "study" / f"{name}.yaml"),
                                 f"--args+=--model.base_model={tiny_model_dir}",
                                 "--args+=--trainer.accelerator=cpu", "--args+=--data.task=synthetic-e2e"]).as_dict()
        spec = StudySpec(**{k: raw[k] for k in StudySpec.__dataclass_fields__})
        runner = StudyRunner(spec)
        # the second row's cells (the first quantized one); qlora-table4's Alpaca cells need the hub task
        second_row = list(dict.fromkeys(c.labels[spec.row_axis] for c in runner.cells))[1]
        cells = [c for c in runner.cells if c.labels[spec.row_axis] == second_row
                 and c.labels.get("dataset") != "alpaca"][:n]
        cwd = os.getcwd()
        try:
            os.chdir(ROOT)  # the configs' relative paths are from the repository root
            assert runner.precheck(cells) == {}, name
        finally:
            os.chdir(cwd)


def test_killing_the_study_kills_its_running_cell(tmp_path):
    """SIGKILL to the study process: its cell's process dies with it (no orphan holding memory), and the
    cell, never marked finished, runs again on the next invocation."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "s"
    python = fake_python(tmp_path, 'echo $$ > "$(dirname "$3")/child.pid"; exec sleep 60')
    script = ("from lightning_qpeft.study.config import StudySpec\n"
              "from lightning_qpeft.study.runner import StudyRunner\n"
              f"spec = StudySpec(base_config='configs/tiny.yaml', axes={{'model.quantization': ['nf4']}}, output_dir={str(out)!r})\n"
              f"StudyRunner(spec, precheck=False, python={python!r}).run()\n")
    study = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    pid_files = []
    for _ in range(200):
        pid_files = list(out.glob("cells/*/child.pid"))
        if pid_files and pid_files[0].read_text().strip():
            break
        time.sleep(0.1)
    child = int(pid_files[0].read_text())
    os.kill(child, 0)  # running
    study.send_signal(signal.SIGKILL)
    study.wait()
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the cell outlived the study")
    assert not list(out.glob("cells/*/result.json"))
    spec = StudySpec(base_config="configs/tiny.yaml", axes={"model.quantization": ["nf4"]}, output_dir=str(out))
    assert len(StudyRunner(spec).pending()) == 1


def test_one_study_folder_one_process(tmp_path):
    import fcntl

    spec = StudySpec(base_config="configs/tiny.yaml", axes={"model.quantization": ["nf4"]}, output_dir=str(tmp_path))
    with open(tmp_path / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="output_dir: another process is running the study"):
            StudyRunner(spec, precheck=False).run()


def test_cells_run_concurrently_one_per_device(tmp_path):
    spec = StudySpec(base_config="configs/tiny.yaml", axes={"model.quantization": ["none", "nf4", "fp4", "int8"]},
                     output_dir=str(tmp_path / "s"))
    python = fake_python(tmp_path, 'd="$(dirname "$3")"; echo "$CUDA_VISIBLE_DEVICES $(date +%s.%N)" > "$d/start"; '
                                   'sleep 1; echo "$(date +%s.%N)" > "$d/end"')
    results = StudyRunner(spec, precheck=False, python=python, log=lambda s: None, devices=["0", "1"]).run()
    assert [r["status"] for r in results] == ["done"] * 4
    spans = []
    for cdir in (tmp_path / "s" / "cells").iterdir():
        device, start = (cdir / "start").read_text().split()
        spans.append((device, float(start), float((cdir / "end").read_text())))
    assert sorted(d for d, _, _ in spans) == ["0", "0", "1", "1"]
    overlaps = 0
    for i, (d1, s1, e1) in enumerate(spans):  # cells that overlap in time never share a device
        for d2, s2, e2 in spans[i + 1:]:
            if s1 < e2 and s2 < e1:
                overlaps += 1
                assert d1 != d2
    assert overlaps >= 1  # and some did run at the same time


def test_precheck_refuses_what_the_run_would_refuse(tiny_model_dir):
    spec = StudySpec(base_config=str(ROOT / "configs" / "tiny.yaml"),
                     axes={"model.quantisation": ["nf4"], "model.adapter.init_args.r": [8, "eight"]},
                     args=["--model.base_model", tiny_model_dir])
    runner = StudyRunner(spec)
    refused = runner.precheck(runner.cells)
    first, second = (refused[c.id] for c in runner.cells)
    assert first == "configuration: error: unrecognized arguments: --model.quantisation nf4"
    assert second.startswith('configuration: error: Parser key "model.adapter"') and "Got value: eight" in second


def test_cpu_workers_run_cells_concurrently_with_a_share_of_the_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    spec = StudySpec(base_config="configs/tiny.yaml", axes={"model.quantization": ["none", "nf4", "fp4"]},
                     output_dir=str(tmp_path / "s"))
    python = fake_python(tmp_path, 'd="$(dirname "$3")"; echo "$OMP_NUM_THREADS $(date +%s.%N)" > "$d/start"; '
                                   'sleep 1; echo "$(date +%s.%N)" > "$d/end"')
    results = StudyRunner(spec, precheck=False, python=python, log=lambda s: None, workers=2).run()
    assert [r["status"] for r in results] == ["done"] * 3
    spans = []
    for cdir in (tmp_path / "s" / "cells").iterdir():
        threads, start = (cdir / "start").read_text().split()
        spans.append((threads, float(start), float((cdir / "end").read_text())))
    assert {t for t, _, _ in spans} == {"2"}  # 4 cores / 2 workers
    starts = sorted(s for _, s, _ in spans)
    ends = sorted(e for _, _, e in spans)
    assert starts[1] < ends[0]  # two ran at once
    assert starts[2] >= ends[0] - 0.05  # and never three


def test_workers_and_devices_are_exclusive(tmp_path):
    spec = StudySpec(base_config="configs/tiny.yaml", axes={"model.quantization": ["nf4"]}, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="workers and devices: set one"):
        StudyRunner(spec, devices=["0", "1"], workers=2)
    with pytest.raises(ValueError, match="workers: 0"):
        StudyRunner(spec, workers=0)


def test_a_finished_cell_whose_files_changed_runs_again(tmp_path):
    """The cell id hashes the arguments; what they point to (the base config's text, an adapter YAML the base
    config names, a data file) is hashed into the result: a change makes the result stale."""
    (tmp_path / "adapter").mkdir()
    adapter = tmp_path / "adapter" / "lora.yaml"
    adapter.write_text("class_path: peft.LoraConfig\ninit_args: {r: 8}\n")
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  adapter: adapter/lora.yaml\n")
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n')
    (tmp_path / "unrelated.yaml").write_text("x: 1\n")
    spec = StudySpec(base_config=str(base), axes={"model.quantization": ["nf4"]}, output_dir=str(tmp_path / "s"),
                     args=["--data.path", str(data)])

    def finish(runner, inputs):
        cdir = runner.cell_dir(runner.cells[0])
        cdir.mkdir(parents=True, exist_ok=True)
        res = {"id": runner.cells[0].id, "status": "done", "metrics": {}}
        if inputs is not None:
            res["inputs"] = inputs
        (cdir / "result.json").write_text(json.dumps(res))

    runner = StudyRunner(spec, precheck=False, log=lambda s: None)
    finish(runner, runner.inputs(runner.cells[0]))
    assert runner.pending() == []
    (tmp_path / "unrelated.yaml").write_text("x: 2\n")
    assert StudyRunner(spec, precheck=False).pending() == []  # a file no argument names
    for path, text in ((adapter, "class_path: peft.LoraConfig\ninit_args: {r: 16}\n"),
                       (base, "model:\n  adapter: adapter/lora.yaml\n  quantization: fp4\n"),
                       (data, '{"a": 2}\n')):
        runner = StudyRunner(spec, precheck=False)
        before = runner.inputs(runner.cells[0])
        path.write_text(text)
        fresh = StudyRunner(spec, precheck=False)
        assert fresh.inputs(fresh.cells[0]) != before, path.name
        assert [c.id for c in fresh.pending()] == [fresh.cells[0].id], path.name  # same id, stale result
        finish(fresh, fresh.inputs(fresh.cells[0]))
    finish(runner, None)  # a result from before inputs were recorded is kept
    assert StudyRunner(spec, precheck=False).pending() == []
