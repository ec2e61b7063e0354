"""Read a local data file into a `datasets.Dataset` of its raw columns, with errors that name file and line.

Config keys (`data.*`): path, val_path, test_path, predict_path (the files; `sources.py` decides what the
columns mean).

Formats, by suffix: `.json` (an array of objects, or JSON lines), `.jsonl`, `.csv` (header row; RFC 4180
quoting: quoted fields may hold commas and CRLF line breaks), `.tsv` (header row; no quoting: every field is
taken literally, so it holds no tab or line break), `.parquet`, and `.txt` (one record a line, e.g. the LoRA
paper's `mr || ref` E2E files). CSV and TSV columns are all read as text. Text files must be UTF-8; the path,
the encoding, NUL bytes, stray CSV quotes and duplicate column names are checked first (`file_checks.py`).

Everything goes through `datasets.load_dataset`, which parses the file once into an Arrow cache and then
memory-maps it: a million-record file is not held in RAM as Python objects. (A JSON *array* is the one
exception: `datasets` parses it with Python's json module once, when it builds the cache; give JSON lines
for very large files.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets

from lightning_qpeft.core.data_error import DataError  # one class for every reader (MMLU's too)
from lightning_qpeft.data.file_checks import TEXT_SUFFIXES, check_csv_quotes, check_header, check_path, check_text

# suffix -> datasets builder
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}


def record_word(path: str | Path) -> str:
    """How a record's position in this file is named in messages: line (JSON lines, text) or record/row."""
    suffix = Path(str(path)).suffix
    return {".jsonl": "line", ".txt": "line", ".csv": "row", ".tsv": "row"}.get(suffix, "record")


def read_file(path: str | Path, key: str = "data.path") -> datasets.Dataset:
    """The raw records of a local file (columns as the file has them).

    Args:
        path: the file.
        key: the config key that named it (for messages).

    Raises:
        DataError: the file is missing, empty, of an unknown type, or does not parse (with file:line).
    """
    path = Path(path).expanduser()
    check_path(path, key)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{key}: {str(path)!r}: unknown file type; use one of {', '.join(BUILDERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{key}: {path} is empty")
    if path.suffix.lower() in TEXT_SUFFIXES:
        check_text(path, key)
    if path.suffix.lower() == ".csv":
        check_csv_quotes(path, key)
    kwargs: dict = {}
    if builder == "csv":
        kwargs = _csv_kwargs(path, key)
    elif builder == "text":
        kwargs = {"keep_linebreaks": False}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parse errors without a line number: find it ourselves
        if "corresponds to no data" in str(e):  # a header, '[]' or blank lines only
            raise DataError(f"{key}: {path} holds no records") from e
        raise DataError(f"{key}: cannot parse {_error_location(path, e)}") from e
    if len(ds) == 0:
        raise DataError(f"{key}: {path} holds no records")
    return ds


def _csv_kwargs(path: Path, key: str) -> dict:
    """Every column as text (ids stay strings, 'NA' stays 'NA'); the header names the columns; TSV unquoted."""
    tsv = path.suffix.lower() == ".tsv"
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f, **_dialect(tsv)), None)
    if not header or not any(h.strip() for h in header):
        raise DataError(f"{key}: {path}:1: no header row")
    check_header(header, path, key)
    features = datasets.Features({name: datasets.Value("string") for name in header})
    quoting = dict(quoting=csv.QUOTE_NONE) if tsv else {}
    return dict(delimiter=_dialect(tsv)["delimiter"], encoding="utf-8-sig", keep_default_na=False, na_filter=False,
                features=features, **quoting)


def _dialect(tsv: bool) -> dict:
    """csv module arguments: TSV fields are literal (no quote processing), CSV's are RFC 4180."""
    return dict(delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else dict(delimiter=",")


def _error_location(path: Path, error: Exception) -> str:
    """`file:line: what` for the first line that does not parse (datasets does not say where)."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix in (".json", ".jsonl"):
        try:
            json.loads(text)
            return f"{path}: {_root_cause(error)}"
        except json.JSONDecodeError as whole:
            if suffix == ".json" and text.lstrip().startswith("["):
                return f"{path}:{whole.lineno}: {whole.msg}"
        for lineno, line in enumerate(text.splitlines(), 1):  # JSON lines
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}:{lineno}: {e.msg}"
        return f"{path}: {_root_cause(error)}"
    if suffix in (".csv", ".tsv"):
        try:
            rows = csv.reader(text.splitlines(keepends=True), **_dialect(suffix == ".tsv"))
            width = None
            for lineno, row in enumerate(rows, 1):
                width = width if width is not None else len(row)
                if row and len(row) != width:
                    return f"{path}: row {lineno - 1} (line {rows.line_num}) has {len(row)} fields, the header {width}"
        except csv.Error as e:
            return f"{path}: {e}"
    return f"{path}: {_root_cause(error)}"


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"
