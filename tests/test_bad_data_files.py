"""Every data file the reader cannot take as it is fails naming the key, the file and the line (and the byte offset
and a guessed encoding for text that is not UTF-8), within seconds, leaving the earlier run's outputs untouched:
encodings, NUL bytes, compressed files, duplicate columns, stray CSV quotes, folders and broken links
(`data/file_checks.py`). TSV fields are literal: a quote in one no longer merges rows.

The cases run the real command line in-process, in the workspace of tests/test_bad_input.py.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path
from typing import Callable

import pytest

from lightning_qpeft.cli import QPeftCLI
from tests.test_bad_input import ROOT, Workspace, workspace  # noqa: F401 (fixture)
from tests.test_config_ranges import assert_refused

GOOD = [{"instruction": f"Say {i}.", "output": f"ok {i}"} for i in range(8)]


def jsonl(records: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def put(w: Workspace, name: str, data: bytes) -> str:
    path = w.files / name
    path.write_bytes(data)
    return str(path)


def link(w: Workspace, name: str, target: str) -> str:
    path = w.files / name
    if not path.is_symlink():
        os.symlink(target, path)
    return str(path)


def folder(w: Workspace, name: str) -> str:
    (w.files / name).mkdir(exist_ok=True)
    return str(w.files / name)


CSV_ROWS = "instruction,output\n" + "".join(f"Say {i},ok {i}\n" for i in range(6))

# (kind, workspace -> the data file, the key that names it, regex of the message)
CASES: list[tuple[str, Callable[[Workspace], str], str, str]] = [
    ("invalid UTF-8 in a JSON lines record",
     lambda w: put(w, "bad-utf8.jsonl", jsonl(GOOD[:1]) + b'{"instruction": "caf\xe9", "output": "x"}\n'),
     "data.path", r"bad-utf8.jsonl:2: not UTF-8 \(byte 0xe9 at byte offset 64\)"),  # 45 + 19 bytes before it
    ("latin-1 CSV", lambda w: put(w, "latin.csv", (CSV_ROWS + "Café crème,très bon\n").encode("latin-1")),
     "data.path", r"latin.csv:8: not UTF-8 \(byte 0xe9 at byte offset \d+\); its bytes read as \w+ \(a guess\); "
                  r"convert the file to UTF-8"),
    ("latin-1 text lines", lambda w: put(w, "latin.txt", "name[Café] || Le Café is nice.\n".encode("latin-1")),
     "data.path", r"latin.txt:1: not UTF-8 \(byte 0xe9 at byte offset 8\)"),  # offsets count from 0
    ("invalid UTF-8 in a JSON array",
     lambda w: put(w, "bad-utf8.json",
                   b'[{"instruction": "a", "output": "b"},\n {"instruction": "\xff", "output": "c"}]'),
     "data.path", r"bad-utf8.json:2: not UTF-8 \(byte 0xff"),
    ("UTF-16 with a byte-order mark", lambda w: put(w, "utf16.jsonl", jsonl(GOOD).decode().encode("utf-16")),
     "data.path", r"utf16.jsonl is UTF-16 \(little-endian byte-order mark\), not UTF-8 text; convert it \(iconv"),
    ("UTF-16 without a byte-order mark", lambda w: put(w, "utf16le.csv", CSV_ROWS.encode("utf-16-le")),
     "data.path", r"utf16le.csv:1: a NUL byte at byte offset 1 \(every other byte NUL: UTF-16 without a byte-order "
                  r"mark\?\)"),
    ("a NUL byte inside a record", lambda w: put(w, "nul.jsonl", jsonl(GOOD[:2]) + b'{"instruction": "a\0"}\n'),
     "data.path", r"nul.jsonl:3: a NUL byte at byte offset \d+; a text data file holds none"),
    ("gzip data under a text name", lambda w: put(w, "packed.jsonl", gzip.compress(jsonl(GOOD))),
     "data.path", r"packed.jsonl is gzip-compressed, not UTF-8 text; convert it \(gunzip it\)"),
    ("a column named twice", lambda w: put(w, "dup.csv", b"instruction,output,output\na,b,c\n"),
     "data.path", r"dup.csv:1: column 'output' appears twice in the header \(columns 2 and 3\); rename one"),
    ("a CSV quote that swallows rows",
     lambda w: put(w, "stray.csv", b'instruction,output\n"Say 1,ok 1\nSay 2,ok 2\nSay 3,"ok 3\nSay 4,ok 4\n'),
     "data.path", r"stray.csv:4: text after a closing double quote \(the field opened at line 2 and swallowed the "
                  r"lines up to here\)"),
    ("a CSV quote never closed", lambda w: put(w, "open.csv", b'instruction,output\nSay 1,"ok 1\nSay 2,ok 2\n'),
     "data.path", r"open.csv:2: a double quote opens a field that is never closed"),
    ("a folder given as a file", lambda w: folder(w, "records.jsonl"),
     "data.path", r"data.path: '.*records.jsonl' is a folder, not a file; give one of the files in it"),
    ("a symbolic link loop", lambda w: link(w, "loop.jsonl", "loop.jsonl"),
     "data.path", r"data.path: '.*loop.jsonl' is a symbolic link loop \(it never reaches a file\)"),
    ("a link to nothing", lambda w: link(w, "dangling.jsonl", "gone.jsonl"),
     "data.path", r"data.path: '.*dangling.jsonl' is a symbolic link to 'gone.jsonl', which does not exist"),
    ("a validation file that is not UTF-8",
     lambda w: put(w, "val-latin.jsonl", jsonl(GOOD[:1]) + '{"instruction": "é", "output": "b"}\n'.encode("latin-1")),
     "data.val_path", r"data.val_path: .*val-latin.jsonl:2: not UTF-8"),
]


def file_args(w: Workspace, key: str, path: str) -> list[str]:
    args = ["--data.task", "alpaca", "--data.path", put(w, "good.jsonl", jsonl(GOOD))]
    return args + [f"--{key}", path]


def test_the_cases_are_distinct():
    assert len({c[0] for c in CASES}) == len({c[3] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("kind, make, key, match", CASES, ids=[c[0] for c in CASES])
def test_bad_data_file_fails_naming_file_and_line(workspace, kind, make, key, match, capsys):
    assert_refused(workspace, file_args(workspace, key, make(workspace)), match, capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(workspace, capsys):
    path = Path(put(workspace, "secret.jsonl", jsonl(GOOD)))
    path.chmod(0)
    assert_refused(workspace, file_args(workspace, "data.path", str(path)), r"cannot read .*secret.jsonl", capsys)


def setup_records(tiny_model_dir: str, *args: str) -> dict:
    cli = QPeftCLI(args=["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
                         "--trainer.logger", "false", *args], run=False)
    cli.datamodule.setup("fit")
    return cli.datamodule.records


def test_a_tsv_field_that_starts_with_a_quote_stays_one_record(tiny_model_dir, tmp_path):
    rows = ["instruction\toutput"] + [f'"Say {i}\tok {i}' if i % 2 else f'Say "{i}"\tok {i}' for i in range(40)]
    path = tmp_path / "quotes.tsv"
    path.write_text("\n".join(rows) + "\n")
    records = setup_records(tiny_model_dir, "--data.task", "alpaca", "--data.path", str(path), "--data.val_size", "4")
    assert len(records["train"]) + len(records["validation"]) == 40
    every = sorted([*records["train"], *records["validation"]], key=lambda r: r["row"])
    assert every[1]["instruction"] == '"Say 1' and every[2]["instruction"] == 'Say "2"'
    assert not any("\t" in r["instruction"] or "\n" in r["output"] for r in every)


def test_quoted_csv_fields_with_commas_line_breaks_and_doubled_quotes_still_read(tiny_model_dir, tmp_path):
    path = tmp_path / "quoted.csv"
    path.write_bytes(b'\xef\xbb\xbfinstruction,output\r\n"Two lines,\r\nwith a comma","He said ""hi"""\r\n'
                     + b"".join(b"Say %d,ok %d\r\n" % (i, i) for i in range(7)))
    records = setup_records(tiny_model_dir, "--data.task", "alpaca", "--data.path", str(path), "--data.val_size", "2")
    every = sorted([*records["train"], *records["validation"]], key=lambda r: r["row"])
    assert len(every) == 8
    assert every[0]["instruction"] == "Two lines,\r\nwith a comma" and every[0]["output"] == 'He said "hi"'
    assert re.fullmatch(r"Say 0", every[1]["instruction"])
