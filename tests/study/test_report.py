"""A study's outputs from finished cells (written here, no process): CSV, Table-4-style Markdown, the
comparison with the baseline, Pareto fronts, plots, hparams, README section."""

import csv
import math
import struct

import pytest

from lightning_qpeft.study.config import StudySpec
from lightning_qpeft.study.plots import pareto_front
from lightning_qpeft.study.report import update_readme, write_reports
from lightning_qpeft.study.runner import StudyRunner

BASE = {"none": 1.0, "nf4": 1.1, "fp4": 1.3}
DELTA = {"lora": 0.0, "ia3": 0.5}
# as the runs declare them (metric_directions.json beside their metrics)
DIRECTIONS = {"val/loss": "lower", "perf/peak_memory_gib": "lower", "perf/tokens_per_s": "higher",
              "params/trainable": "lower", "*/rougeL": "higher"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """12 cells: 3 quantizations x 2 adapters x 2 seeds; fp4/ia3 failed; val/loss = base + delta + seed/100."""
    out = tmp_path_factory.mktemp("report")
    spec = StudySpec(name="fake", base_config="configs/tiny.yaml", output_dir=str(out),
                     axes={"model.quantization": ["none", "nf4", "fp4"],
                           "model.adapter": {"lora": "configs/adapter/lora.yaml", "ia3": "x/ia3.yaml"},
                           "seed_everything": [1, 2]},
                     report={"columns": ["model.adapter"], "metrics": ["val/loss", "test/rougeL"], "baseline": "none"})
    runner = StudyRunner(spec, log=lambda s: None)
    for cell in runner.cells:
        q, a, s = cell.labels.values()
        if (q, a) == ("fp4", "ia3"):
            res = {"status": "failed", "error": "RuntimeError: boom\nmore", "error_tail": "", "metrics": {}, "config": ""}
        else:
            val = BASE[q] + DELTA[a] + int(s) / 100
            res = {"status": "done", "error": "", "error_tail": "", "config": "", "directions": DIRECTIONS,
                   "metrics": {"val/loss": val, "perf/peak_memory_gib": {"none": 4.0, "nf4": 1.5, "fp4": 1.5}[q],
                               "perf/tokens_per_s": 1000.0 - 100 * val, "params/trainable": 7168.0}}
        runner._finish(cell, res, 10.0)
    results = runner.results()
    write_reports(results)
    return results


def test_csv_has_a_row_per_cell_with_full_precision(finished):
    rows = list(csv.DictReader(open(finished.out / "results.csv")))
    assert len(rows) == 12
    assert list(rows[0])[:7] == ["cell", "model.quantization", "model.adapter", "seed_everything", "status", "error",
                                 "wall_time_s"]
    r = rows[3]  # none / ia3 / seed 2
    assert (r["model.quantization"], r["model.adapter"], r["seed_everything"]) == ("none", "ia3", "2")
    assert float(r["val/loss"]) == 1.0 + 0.5 + 2 / 100 and r["params/trainable"] == "7168"
    assert [r["status"] for r in rows[10:]] == ["failed", "failed"] and rows[10]["error"] == "RuntimeError: boom\nmore"
    assert rows[10]["val/loss"] == "" and rows[10]["test/rougeL"] == ""


def test_markdown_table_is_grouped_like_qlora_table4(finished):
    report = (finished.out / "report.md").read_text()
    # seeds are averaged (mean ± std, n); the best of each column is bold; a failed group says so
    assert ("| model.quantization | lora | ia3 |\n|---|---|---|\n"
            "| none | **1.015 ± 0.007071 (n=2)** | **1.515 ± 0.007071 (n=2)** |\n"
            "| nf4 | 1.115 ± 0.007071 (n=2) | 1.615 ± 0.007071 (n=2) |\n"
            "| fp4 | 1.315 ± 0.007071 (n=2) | failed |") in report
    assert "No finished cell logged `test/rougeL`" in report  # the runs did not compute it
    assert "10 done, 2 failed" in report
    assert "- `fp4__ia3__1-" in report and "(failed): RuntimeError: boom" in report


def test_baseline_comparison_pairs_cells_that_differ_only_in_the_row(finished):
    report = (finished.out / "report.md").read_text()
    # nf4 vs none over (adapter, seed) pairs: +0.1 on 1.01, 1.02 (lora) and 1.51, 1.52 (ia3)
    lora, ia3 = [100 * 0.1 / b for b in (1.01, 1.02)], [100 * 0.1 / b for b in (1.51, 1.52)]
    assert [f"{sum(v) / len(v):+.1f}" for v in (lora + ia3, lora, ia3)] == ["+8.2", "+9.9", "+6.6"]
    assert "- nf4: val/loss +8.2 % vs none on average over 4 paired cell(s); lora +9.9 %, ia3 +6.6 %" in report
    # fp4: only its lora cells finished, so only they are compared
    assert "- fp4: val/loss +29.6 % vs none on average over 2 paired cell(s); lora +29.6 %\n" in report


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plots(finished):
    plots = finished.out / "plots"
    names = sorted(p.name for p in plots.glob("*.png"))
    # a bar chart for each metric some finished cell has (no test/rougeL, adapter size or MFU here)
    assert names == ["bar_params_trainable.png", "bar_perf_peak_memory_gib.png", "bar_perf_tokens_per_s.png",
                     "bar_val_loss.png", "bar_wall_time_s.png", "quality_vs_memory.png", "quality_vs_throughput.png"]
    w, h = png_size(plots / "quality_vs_memory.png")
    assert 400 < w < 1000 and 300 < h < 600  # small enough to commit
    assert "![quality_vs_memory](plots/quality_vs_memory.png)" in (finished.out / "report.md").read_text()


def test_pareto_front():
    pts = [(4.0, 1.0), (1.5, 1.1), (1.5, 1.3), (1.0, 2.0), (5.0, 0.9), (4.5, 1.0)]
    assert pareto_front(pts) == [3, 1, 0, 4]  # (4.5, 1.0) is dominated by (4.0, 1.0)
    # higher quality is better: the front flips
    assert pareto_front([(1.0, 0.2), (2.0, 0.5), (3.0, 0.4)], y_lower=False) == [0, 1]


def test_hparams_per_cell(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_qpeft.study.hparams import write_hparams

    runs = sorted(p.name for p in (finished.out / "tb").iterdir())
    assert runs == sorted(c.id for c in finished.cells)
    acc = EventAccumulator(str(finished.out / "tb" / finished.cells[0].id))
    acc.Reload()
    assert acc.Scalars("val/loss")[0].value == pytest.approx(1.01)
    # NaN metrics are left out instead of breaking the summary
    path = write_hparams(finished.out / "tb2", "x", {"a": "b"}, {"m": math.nan, "n": 1.0})
    acc = EventAccumulator(str(path))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["n"]


def test_readme_section(finished, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# X\n\nintro\n<!-- study:fake:begin -->\nold\n<!-- study:fake:end -->\nafter\n")
    update_readme(finished, str(readme))
    text = readme.read_text()
    assert text.startswith("# X\n\nintro\n<!-- study:fake:begin -->\n") and text.endswith("<!-- study:fake:end -->\nafter\n")
    assert "old" not in text and "| nf4 | 1.115 ± 0.007071 (n=2) |" in text
    assert "![quality_vs_memory](docs/study/fake/quality_vs_memory.png)" in text
    assert (tmp_path / "docs" / "study" / "fake" / "quality_vs_memory.png").exists()
    update_readme(finished, str(readme))  # idempotent
    assert readme.read_text() == text

    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="readme: .* has no section marked <!-- study:fake:begin -->"):
        update_readme(finished, str(readme))
