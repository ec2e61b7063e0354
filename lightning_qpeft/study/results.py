"""`StudyResults`: a study's grid and what each finished cell left (its result.json), the one input of every
report (`report.py`, `plots.py`).

The runner writes each cell's result.json and hands back `StudyResults`; reports are functions of them and never
see the runner, so a report can be rewritten from the files alone (`read_results`, `--report_only`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning_qpeft.study.collect import study_directions
from lightning_qpeft.study.config import Cell, StudySpec, expand


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.id


def read_result(out: Path, cell: Cell) -> Optional[dict[str, Any]]:
    """The cell's result.json, or None while it has not finished."""
    path = cell_dir(out, cell) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


@dataclass(frozen=True)
class StudyResults:
    """The grid in order and the results of its finished cells.

    Attributes:
        spec: the study.
        cells: every cell of the grid, in the grid's order.
        results: cell id -> its result.json (finished cells only).
    """

    spec: StudySpec
    cells: list[Cell]
    results: dict[str, dict[str, Any]]

    @property
    def out(self) -> Path:
        return self.spec.out_dir()

    def result(self, cell: Cell) -> Optional[dict[str, Any]]:
        return self.results.get(cell.id)

    @property
    def directions(self) -> dict[str, str]:
        """Which way each metric is better, as the cells' runs declared it (`collect.study_directions`)."""
        return study_directions(self.results.values())


def read_results(spec: StudySpec, cells: Optional[list[Cell]] = None) -> StudyResults:
    """What the study folder holds now, for `cells` (default: the whole grid)."""
    cells = expand(spec) if cells is None else cells
    found = {c.id: r for c in cells if (r := read_result(spec.out_dir(), c)) is not None}
    return StudyResults(spec, cells, found)
