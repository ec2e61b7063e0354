"""`python -m lightning_qpeft study`: run a study from its YAML, resume it, report it.

    python -m lightning_qpeft study --config configs/study/tiny.yaml [--rerun failed] [--max_cells N]
    python -m lightning_qpeft study --config configs/study/device-efficiency.yaml --devices [0,1,2,3]
    python -m lightning_qpeft study --config configs/study/tiny.yaml --report_only true --readme docs/studies.md
        --readme_assets docs/study/tiny      (the tables and plots between docs/studies.md's markers)

The study config's keys are `StudySpec`'s (see config.py, or `--help`); every key can also be given or
overridden on the command line, e.g. `--output_dir /tmp/s`, or `--args+=--model.base_model=/ckpt/llama`
(appends one argument to every cell's run). A second invocation runs only the cells without a result.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_qpeft.study.config import StudySpec
from lightning_qpeft.study.runner import RERUN


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m lightning_qpeft study",
                            description="Run a grid of runs (quantization x adapter x task x ...) and compare them.")
    parser.add_argument("--config", action=ActionConfigFile, help="the study config (configs/study/*.yaml)")
    parser.add_class_arguments(StudySpec, None, fail_untyped=True)
    parser.add_argument("--rerun", type=str, choices=RERUN, default="none",
                        help="cells to run again: none (finished cells stay), failed (failed and refused), all")
    parser.add_argument("--max_cells", type=Optional[int], default=None,
                        help="run at most this many missing cells now (the rest on the next invocation)")
    parser.add_argument("--precheck", type=bool, default=True,
                        help="instantiate each cell's config in this process first; refusals cost no run")
    parser.add_argument("--devices", type=Optional[list[Union[int, str]]], default=None,
                        help="CUDA devices to run cells on concurrently, one cell per device, e.g. [0,1,2,3]; "
                             "default: one cell at a time")
    parser.add_argument("--workers", type=int, default=1,
                        help="without --devices: cells run at once (CPU studies; each gets cpu_count // workers "
                             "threads)")
    parser.add_argument("--dry_run", type=bool, default=False, help="list the cells and their arguments; run nothing")
    parser.add_argument("--report_only", type=bool, default=False, help="rewrite the outputs from finished cells")
    parser.add_argument("--readme", type=Optional[str], default=None,
                        help="a Markdown file with <!-- study:NAME:begin/end --> markers: put the tables and plots there")
    parser.add_argument("--readme_assets", type=Optional[str], default=None,
                        help="where --readme copies the plots (default: docs/study/NAME beside the file)")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    from lightning_qpeft.study.report import update_readme, write_reports
    from lightning_qpeft.study.runner import StudyRunner

    parser = build_parser()
    cfg = parser.parse_args(argv)
    # plain data, not parser.instantiate: that would turn axis values holding a class_path into objects
    raw = cfg.as_dict()
    spec = StudySpec(**{f.name: raw[f.name] for f in dataclasses.fields(StudySpec)})
    if spec.name is None:
        configs = cfg.get("config") or []
        spec.name = Path(str(configs[-1])).stem if configs else "study"
    runner = StudyRunner(spec, rerun=cfg.rerun, max_cells=cfg.max_cells, precheck=cfg.precheck, devices=cfg.devices,
                         workers=cfg.workers, report=write_reports)
    if cfg.dry_run:
        for cell in runner.cells:
            state = (runner.result(cell) or {}).get("status", "not run")
            print(f"{cell.id} [{state}]\n    python -m lightning_qpeft fit {shlex.join(runner.cell_args(cell))}")
        return
    if cfg.report_only:
        write_reports(runner.results(), plots=True)
    else:
        runner.run()
    print(f"results: {runner.out / 'results.csv'}, report: {runner.out / 'report.md'}, "
          f"TensorBoard: tensorboard --logdir {runner.out / 'tb'}")
    if cfg.readme:
        print(f"updated {update_readme(runner.results(), cfg.readme, cfg.readme_assets)}")
