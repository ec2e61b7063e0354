"""The grid in TensorBoard's HPARAMS view: one run per cell under `<study>/tb/<cell id>`.

Each cell's axis labels (and status) are its hyperparameters; its reduced metrics (the numbers of
results.csv) are the metric columns. `tensorboard --logdir studies/<name>/tb` shows the table, parallel
coordinates and scatter plots of the whole study. Written with `torch.utils.tensorboard`, as
`SummaryWriter.add_hparams` does, but into the cell's own folder (add_hparams would make a timestamped one,
and a rerun cell would then appear twice).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any


def write_hparams(tb_dir: Path, cell_id: str, hparams: dict[str, Any], metrics: dict[str, float]) -> Path:
    """Replace the cell's hparams run with these labels and metrics (NaN/None metrics are left out)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    run_dir = Path(tb_dir) / cell_id
    shutil.rmtree(run_dir, ignore_errors=True)
    values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    exp, ssi, sei = hparams_summary({k: str(v) for k, v in hparams.items()}, values)
    with SummaryWriter(log_dir=str(run_dir)) as writer:
        fw = writer._get_file_writer()
        fw.add_summary(exp)
        fw.add_summary(ssi)
        fw.add_summary(sei)
        for k, v in values.items():
            writer.add_scalar(k, v)
    return run_dir
