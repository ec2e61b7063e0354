"""QLoRA's MMLU prompt files, built from the MMLU CSVs that ship in data/mmlu: the `mmlu` asset of `fetch`, and
the build on demand when `mmlu.path` names one of them and it is missing.

    python -m lightning_qpeft fetch mmlu     # -> data/mmlu/{zero,five}_shot_mmlu_{val,test}.json

The files hold Hendrycks' prompts (`mmlu_prompt`), one `{"subject","input","output"}` object a line. In the
five-shot files k was lowered per question until the prompt had at most 2048 tokens of the LLaMA-2 tokenizer,
which is under Meta's licence and stays out of the repository. The k it gives is recorded instead, in
`mmlu_qlora_k.json` beside this module (for each split and subject, the CSV rows, counted from 0, whose k is
below 5), and the prompts are built with those k; with the LLaMA-2 tokenizer `mmlu_sources.load_items("csv", ...)`
derives the same k (tests/tasks/test_mmlu_prompt.py). A built file must have the md5 of QLoRA's file or
it is not written; writes are atomic (`utils/atomic.py`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lightning_qpeft.core.data_error import DataError
from lightning_qpeft.evaluation.mmlu_data import format_qlora_json, read_csv_folder
from lightning_qpeft.tasks.mmlu_prompt import build_items
from lightning_qpeft.utils.atomic import atomic_file

K_TABLE = Path(__file__).with_name("mmlu_qlora_k.json")
FETCH = "python -m lightning_qpeft fetch mmlu"


@dataclass(frozen=True)
class PromptFile:
    """One of QLoRA's data/mmlu files.

    Attributes:
        split: val or test.
        shots: 0 or 5 solved dev examples (five-shot: fewer where the prompt passed 2048 LLaMA-2 tokens).
        md5: of QLoRA's file.
    """

    split: str
    shots: int
    md5: str


PROMPT_FILES: dict[str, PromptFile] = {
    "zero_shot_mmlu_val.json": PromptFile("val", 0, "e1425749a7d71425e7e15a01eff94c86"),
    "zero_shot_mmlu_test.json": PromptFile("test", 0, "7e8495f2a6afd669e98e28a5e87ca6e6"),
    "five_shot_mmlu_val.json": PromptFile("val", 5, "20b3a85a38459e7dbd19cb5c78b9c0e5"),
    "five_shot_mmlu_test.json": PromptFile("test", 5, "e0b01ad235a75d1f01e04e91c7c38937"),
}


def has_csvs(root: Path, split: str) -> bool:
    """`root` holds MMLU's dev/ folder and the split's."""
    return (root / "dev").is_dir() and (root / split).is_dir()


def build(csv_root: str | Path, name: str) -> bytes:
    """The bytes of QLoRA's file `name`, built from the CSV folder `csv_root` (`<root>/{dev,val,test}/*.csv`).

    Raises:
        DataError: the CSVs do not give QLoRA's file (its md5 differs).
    """
    spec = PROMPT_FILES[name]
    questions, dev = read_csv_folder(csv_root, spec.split)
    start_k = None
    if spec.shots:
        lowered = json.loads(K_TABLE.read_text(encoding="utf-8"))[spec.split]
        k_of = {(subject, row): int(k) for subject, by_k in lowered.items() for k, rows in by_k.items() for row in rows}
        rows: dict[str, int] = {}
        start_k = []
        for q in questions:
            row = rows[q.subject] = rows.get(q.subject, -1) + 1
            start_k.append(k_of.get((q.subject, row), spec.shots))
    data = format_qlora_json(build_items(questions, dev, spec.shots, start_k=start_k)).encode("utf-8")
    got = hashlib.md5(data).hexdigest()
    if got != spec.md5:
        raise DataError(
            f"mmlu.path: {name} built from the CSVs in {csv_root} has md5 {got}, not QLoRA's {spec.md5}: the CSVs "
            "are not MMLU's as shipped in data/mmlu (restore them with git checkout data/mmlu); for other "
            "questions in MMLU's layout use mmlu.source csv"
        )
    return data


def write(csv_root: str | Path, path: Path) -> None:
    """Build `path` (one of PROMPT_FILES, by name) from `csv_root` and write it atomically."""
    data = build(csv_root, path.name)
    with atomic_file(path) as f:
        f.write(data)


def is_built(path: Path) -> bool:
    """`path` exists with the md5 of QLoRA's file of that name."""
    return path.is_file() and hashlib.md5(path.read_bytes()).hexdigest() == PROMPT_FILES[path.name].md5


def build_on_demand(path: str | Path) -> bool:
    """Build a missing QLoRA file from the CSVs beside it (data/mmlu/five_shot_mmlu_val.json from data/mmlu's
    dev/ and val/); returns whether it built one. Takes well under a second, so `mmlu.path` may name a file
    that `fetch mmlu` has not built yet.

    Raises:
        DataError: `path` is one of QLoRA's file names but its folder has no CSVs to build it from.
    """
    path = Path(path)
    if path.is_file() or path.name not in PROMPT_FILES:
        return False
    if not has_csvs(path.parent, PROMPT_FILES[path.name].split):
        raise DataError(
            f"mmlu.path: no such file: {str(path)!r}, and no MMLU CSVs beside it to build it from (expected "
            f"{path.parent}/dev/ and {path.parent}/{PROMPT_FILES[path.name].split}/); the repository's "
            f"data/mmlu has them: use mmlu.path data/mmlu/{path.name}, or run {FETCH} --dest {path.parent} "
            "--source <a folder with MMLU's dev/ val/ test/ CSVs>"
        )
    from lightning.pytorch.utilities import rank_zero_info

    start = time.time()
    write(path.parent, path)
    rank_zero_info(f"mmlu: built {path} from the CSVs beside it in {time.time() - start:.1f} s (md5 checked)")
    return True


def fetch_mmlu(dest: Path, force: bool, source: Optional[str]) -> Path:
    """The `fetch mmlu` asset: every missing or stale QLoRA file in `dest`, built from the CSVs in `source`
    (default: `dest`'s own dev/ val/ test/); files already there with QLoRA's md5 are kept unless `force`."""
    csv_root = Path(source) if source is not None else dest
    if not all(has_csvs(csv_root, split) for split in ("val", "test")):
        raise FileNotFoundError(
            f"fetch mmlu: {csv_root} has no dev/, val/ and test/ folders of MMLU CSVs; the repository ships them "
            "in data/mmlu (git checkout data/mmlu), or pass --source DIR with that layout"
        )
    start = time.time()
    built = []
    for name in PROMPT_FILES:
        if force or not is_built(dest / name):
            write(csv_root, dest / name)
            built.append(name)
    what = f"built {', '.join(built)}" if built else "all four files already there"
    print(f"fetch mmlu: {what} in {dest} ({time.time() - start:.1f} s; md5 of QLoRA's files checked)")
    return dest
