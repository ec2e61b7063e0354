"""`python -m lightning_qpeft study`: the command line over the runner and the report."""

from pathlib import Path

import pytest

from lightning_qpeft.study.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_lists_cells(capsys, tmp_path):
    main(["--config", str(ROOT / "configs" / "study" / "tiny.yaml"), "--output_dir", str(tmp_path), "--dry_run", "true"])
    out = capsys.readouterr().out
    assert out.count("[not run]") == 16
    assert "python -m lightning_qpeft fit --config configs/tiny.yaml --trainer.enable_progress_bar false" in out
    assert not any(tmp_path.iterdir())


def test_report_only_and_readme(tmp_path, capsys):
    """Without running anything: every cell 'not run' in results.csv, the README section says so."""
    config = tmp_path / "mini.yaml"
    config.write_text("base_config: configs/tiny.yaml\naxes:\n  model.quantization: [none, nf4]\n"
                      "report: {readme_plots: []}\n")
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- study:mini:begin -->\n<!-- study:mini:end -->\n")
    main(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--report_only", "true",
          "--readme", str(readme)])
    csv_text = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(csv_text) == 3 and all(",not run," in line for line in csv_text[1:])
    assert "2 cells: 2 not run." in readme.read_text()
    assert "updated" in capsys.readouterr().out


def test_a_misspelled_study_key_fails_naming_it(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("base_config: configs/tiny.yaml\naxes: {model.quantization: [nf4]}\nevaluat: [test]\n")
    with pytest.raises(SystemExit):
        main(["--config", str(config)])
    assert "evaluat" in capsys.readouterr().err
