"""Where records come from: local JSON / JSON-lines files and built-in tasks, read with `datasets`.

Config keys (`data.*`):
    task:       a registered task name (`TASKS`), or `file` for a local file in `data.path`
    path:       local file of the task's records (.json array, .jsonl); overrides the task's built-in source

Every source yields canonical records: `instruction` (may be empty), `input` (may be empty), `output`, and
optionally `references` (every acceptable output, for generation metrics). Readers go through
`datasets.load_dataset`, which memory-maps the parsed records (Arrow) instead of holding Python objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import datasets

from lightning_qpeft.data.errors import DataError
from lightning_qpeft.data.synthetic import synthetic_e2e
from lightning_qpeft.data.synthetic_mc import synthetic_mc_splits

CANONICAL = ("instruction", "input", "output")


@dataclass(frozen=True)
class Task:
    """A named task.

    Attributes:
        name: the config value of `data.task`.
        template: default prompt template.
        builtin: generates (train, validation, test) records offline, given a seed; None for file tasks.
        description: one line for docs.
    """

    name: str
    template: str
    builtin: Optional[Callable[[int], tuple[list, list, list]]] = None
    description: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def _synthetic_e2e_splits(seed: int) -> tuple[list, list, list]:
    # separate seeds per split: validation and test meaning representations are unseen combinations
    return synthetic_e2e(2000, seed), synthetic_e2e(200, seed + 1), synthetic_e2e(200, seed + 2)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("synthetic-e2e", "alpaca", _synthetic_e2e_splits, "built-in E2E-style data-to-text (offline)"),
        # input: the zero-shot MMLU prompt, as the MMLU scorer builds it; output: the answer letter
        Task("synthetic-mc", "plain", synthetic_mc_splits, "built-in MMLU-format multiple choice (offline)"),
        Task("file", "alpaca", None, "a local Alpaca-style (instruction/input/output) or input/output file"),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"data.task: unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def _json_error_location(path: Path) -> str:
    """Find the first line that does not parse, for an error message `datasets` does not give."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}:{lineno}: {e.msg}"
        return str(path)
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return f"{path}:{e.lineno}: {e.msg}"
    return str(path)


def read_json_records(path: str | Path, key: str = "data.path") -> datasets.Dataset:
    """Records of a .json (array) or .jsonl file, canonicalised and checked.

    Raises:
        DataError: the file is missing or empty, a line does not parse, or a record lacks `output`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: no such file: {str(path)!r}")
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{key}: {str(path)!r} is not a .json or .jsonl file")
    if path.stat().st_size == 0:
        raise DataError(f"{key}: {path} is empty")
    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in DatasetGenerationError without a line number
        raise DataError(f"{key}: cannot parse {_json_error_location(path)}") from e
    return canonicalise(ds, str(path), jsonl=path.suffix == ".jsonl")


def canonicalise(ds: datasets.Dataset, origin: str, jsonl: bool = False) -> datasets.Dataset:
    """Check the records have `output` (and `input` or `instruction`), fill the optional fields with ''."""
    if len(ds) == 0:
        raise DataError(f"{origin}: no records")
    columns = set(ds.column_names)
    if "output" not in columns:
        raise DataError(f"{origin}: records have no 'output' field (fields: {sorted(columns)})")
    if not columns & {"instruction", "input"}:
        raise DataError(f"{origin}: records need 'instruction' or 'input' beside 'output'")
    for col in ("instruction", "input"):
        if col not in columns:
            ds = ds.add_column(col, [""] * len(ds))
    where = "line" if jsonl else "record"
    for i, out in enumerate(ds["output"]):
        if not isinstance(out, str):
            raise DataError(f"{origin}: {where} {i + 1} has no 'output' string (got {out!r})")
    extra = [c for c in ds.column_names if c not in (*CANONICAL, "references")]
    ds = ds.remove_columns(extra)
    return ds.map(lambda r: {"instruction": r["instruction"] or "", "input": r["input"] or ""})


def load_task_splits(
    task: str, path: Optional[str], val_path: Optional[str], test_path: Optional[str], seed: int
) -> dict[str, Optional[datasets.Dataset]]:
    """The task's train / validation / test records (validation None: split it off train)."""
    spec = get_task(task)
    if path is None and spec.builtin is None:
        raise DataError(f"data.path: task {task!r} needs a file; set data.path")
    splits: dict[str, Optional[datasets.Dataset]] = {"train": None, "validation": None, "test": None}
    if spec.builtin is not None and path is None:
        train, val, test = spec.builtin(seed)
        splits = {k: datasets.Dataset.from_list(v) for k, v in zip(splits, (train, val, test))}
    else:
        splits["train"] = read_json_records(path, "data.path")
    if val_path is not None:
        splits["validation"] = read_json_records(val_path, "data.val_path")
    if test_path is not None:
        splits["test"] = read_json_records(test_path, "data.test_path")
    return splits
