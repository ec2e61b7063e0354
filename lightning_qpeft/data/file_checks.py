"""What a local data file must be before `datasets` parses it, with errors that name the file, line and byte.

Config keys (`data.*`): path, val_path, test_path, predict_path (`readers.read_file` calls these checks).

- The path is a regular, readable file: a folder, a symbolic link loop or a link to nothing is named as such.
- Text files (.json, .jsonl, .csv, .tsv, .txt) are UTF-8 (a UTF-8 byte-order mark is fine): a UTF-16/32 mark,
  a gzip or zip file, a NUL byte or a byte sequence that is not UTF-8 is refused with its line and byte offset,
  and for non-UTF-8 text the encoding its bytes suggest (a guess by charset_normalizer).
- CSV follows RFC 4180: a field that starts with a double quote runs to the next lone one. A stray quote would
  silently merge the rows up to the next one into one field; parsed strictly first, such a file is refused at
  the line where the quoted field opens. TSV has no quoting (IANA text/tab-separated-values): `readers.py` reads
  its fields literally, so a quote in a TSV field is a character like any other.
- A header must name each column once (pandas would rename a second `output` to `output.1`).

The file is read in chunks of `CHUNK` bytes: a large file costs one pass, not its size in memory.
"""

from __future__ import annotations

import codecs
import csv
import os
from pathlib import Path

from lightning_qpeft.core.data_error import DataError

CHUNK = 1 << 20
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
# leading bytes -> what the file is, and how to make it UTF-8 text
SIGNATURES = (
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian byte-order mark)", "iconv -f UTF-32 -t UTF-8"),
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian byte-order mark)", "iconv -f UTF-32 -t UTF-8"),
    (b"\xff\xfe", "UTF-16 (little-endian byte-order mark)", "iconv -f UTF-16 -t UTF-8"),
    (b"\xfe\xff", "UTF-16 (big-endian byte-order mark)", "iconv -f UTF-16 -t UTF-8"),
    (b"\x1f\x8b", "gzip-compressed", "gunzip it"),
    (b"PK\x03\x04", "a zip archive (or a spreadsheet)", "extract or export it as text"),
)


def check_path(path: Path, key: str) -> None:
    """Refuse a path that is not a regular, readable file, saying what it is instead."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (RuntimeError, OSError) as e:
            if isinstance(e, RuntimeError) or getattr(e, "errno", None) == 40:  # ELOOP
                raise DataError(f"{key}: {str(path)!r} is a symbolic link loop (it never reaches a file); point "
                                "it at a file") from None
            raise DataError(f"{key}: {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not "
                            "exist; point it at a file") from None
    if path.is_dir():
        raise DataError(f"{key}: {str(path)!r} is a folder, not a file; give one of the files in it")
    if not path.exists():
        raise DataError(f"{key}: no such file: {str(path)!r}")
    if not path.is_file():
        raise DataError(f"{key}: {str(path)!r} is not a regular file (a pipe or device?); give a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{key}: cannot read {str(path)!r} (permission denied); make it readable")


def check_text(path: Path, key: str) -> None:
    """Refuse a text data file that is not UTF-8, naming the line and byte offset of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1  # of the chunk's first byte
    with open(path, "rb") as f:
        head = f.read(4)
        for signature, what, fix in SIGNATURES:
            if head.startswith(signature):
                raise DataError(f"{key}: {path} is {what}, not UTF-8 text; convert it ({fix})")
        f.seek(0)
        while True:
            chunk = f.read(CHUNK)
            nul = chunk.find(b"\0")
            text = chunk[:nul] if nul >= 0 else chunk
            try:
                decoder.decode(text, final=not chunk or nul >= 0)
            except UnicodeDecodeError as e:
                at = max(0, e.start - (len(e.object) - len(text)))  # e.object: up to 3 held bytes + this chunk
                where = line + chunk.count(b"\n", 0, at)
                raise DataError(
                    f"{key}: {path}:{where}: not UTF-8 (byte 0x{e.object[e.start]:02x} at "
                    f"byte offset {offset + at}){_guess(path)}; convert the file to UTF-8"
                ) from None
            if nul >= 0:
                where = line + chunk.count(b"\n", 0, nul)
                utf16 = " (every other byte NUL: UTF-16 without a byte-order mark?)" if _looks_utf16(chunk) else ""
                raise DataError(f"{key}: {path}:{where}: a NUL byte at byte offset {offset + nul}{utf16}; a text "
                                "data file holds none: convert it to UTF-8 text")
            if not chunk:
                return
            offset += len(chunk)
            line += chunk.count(b"\n")


def _looks_utf16(chunk: bytes) -> bool:
    sample = chunk[:1024]
    return len(sample) >= 4 and (sample[1::2].count(0) > 0.4 * len(sample) / 2
                                 or sample[0::2].count(0) > 0.4 * len(sample) / 2)


def _guess(path: Path) -> str:
    """'; its bytes read as cp1252 (a guess)' from the file's first bytes, or '' when nothing fits."""
    try:
        from charset_normalizer import from_bytes
    except ImportError:
        return ""
    with open(path, "rb") as f:
        best = from_bytes(f.read(CHUNK)).best()
    if best is None or best.encoding in ("utf_8", "ascii"):
        return ""
    return f"; its bytes read as {best.encoding} (a guess)"


def check_header(header: list[str], path: Path, key: str) -> None:
    """Refuse a header that names a column twice."""
    seen: dict[str, int] = {}
    for i, name in enumerate(header, 1):
        if name in seen:
            raise DataError(f"{key}: {path}:1: column {name!r} appears twice in the header (columns {seen[name]} "
                            f"and {i}); rename one")
        seen[name] = i


def check_csv_quotes(path: Path, key: str) -> None:
    """Refuse a CSV whose double quotes would merge rows: parsed strictly (RFC 4180), a quoted field must end at
    a lone quote followed by a comma or a line break."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        first = 1  # the line the row being read starts on
        try:
            for _ in reader:
                first = reader.line_num + 1
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise DataError(
                    f"{key}: {path}:{first}: a double quote opens a field that is never closed: it would swallow "
                    "every line to the end of the file; double the quotes inside a quoted field (\"\") or remove "
                    "the stray one"
                ) from None
            spans = f" (the field opened at line {first} and swallowed the lines up to here)" \
                if reader.line_num > first else ""
            raise DataError(
                f"{key}: {path}:{reader.line_num}: text after a closing double quote{spans}; a field that starts "
                "with a quote must end with one: quote the whole field and double the quotes inside it (\"\"), or "
                "remove the stray quote"
            ) from None
