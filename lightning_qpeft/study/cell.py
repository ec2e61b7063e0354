"""One study cell, run by the study runner in a process of its own: fit, then the evaluations, one logger.

    python -m lightning_qpeft.study.cell CELL_DIR/cell.json

`cell.json` holds `args` (what `python -m lightning_qpeft fit` would get), `evaluate` (`test`, `validate`) and
`fit` (false: no training, the evaluations of the model as configured).
Fit and the evaluations share the process, the trained weights in memory and the TensorBoard logger, so one
event folder holds every number of the cell and the base model is loaded once. The same cell by hand is
`python -m lightning_qpeft fit ARGS`, then `test ARGS --model.adapter null --model.adapter_path <log>/adapter`.

What the runner cannot see from outside is written beside cell.json:
    error.json    the exception that ended the run: its class, the classes it derives from (a `ConfigError` is
                  one of the project's refusals: `collect.is_refused`) and its message
    process.json  peak CUDA memory of this process (torch.cuda.max_memory_allocated), when CUDA is used
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from lightning_qpeft.study.collect import error_record
from lightning_qpeft.utils.atomic import atomic_file


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path, "w") as f:
        json.dump(data, f, indent=1)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    error_path = spec_path.parent / "error.json"
    try:
        from lightning_qpeft.cli import QPeftCLI

        if spec.get("fit", True):
            cli = QPeftCLI(args=["fit", *spec["args"]])
            if cli.trainer.interrupted:
                raise RuntimeError("fit was interrupted (signal or KeyboardInterrupt); the cell is incomplete")
        else:  # the model as configured (a base model zero-shot): evaluations only
            cli = QPeftCLI(args=spec["args"], run=False)
        for stage in spec.get("evaluate", []):
            getattr(cli.trainer, stage)(cli.model, datamodule=cli.datamodule)
        _record_cuda_peak(spec_path.parent / "process.json")
    except SystemExit as e:
        if e.code not in (0, None):  # jsonargparse printed why; the runner quotes the log's last lines
            _write_json(error_path, {"type": "SystemExit", "types": ["SystemExit"],
                                     "message": "the configuration was refused (see the log)"})
        raise
    except BaseException as e:
        _write_json(error_path, error_record(e))
        raise


def _record_cuda_peak(path: Path) -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        _write_json(path, {"peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30})


if __name__ == "__main__":
    main()
