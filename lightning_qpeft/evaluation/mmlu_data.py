"""MMLU questions from the layouts they come in: QLoRA's JSON prompt files (read as scored `Item`s: subject,
prompt, answer letter, k), the original CSV folders and the `cais/mmlu` hub dataset (read as `Question`s).
`mmlu_sources.load_items` picks the layout `mmlu.source` names; `mmlu_files` builds QLoRA's files from the CSVs.

CSV cells are used as the file has them (the csv module keeps "None" as "None", as pandas 1.x did when QLoRA's
files were built; pandas >= 2 would read it as NaN and print "nan").
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from lightning_qpeft.core.data_error import DataError
from lightning_qpeft.tasks.mmlu_prompt import CHOICES, Item, Question

HUB_SPLITS = {"val": "validation", "test": "test", "dev": "dev"}


def token_counter(tokenizer: Any) -> Callable[[list[str]], list[int]]:
    """Batched prompt length in tokens, without special tokens (what Hendrycks' 2048 limit counts)."""
    return lambda texts: [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def infer_k(prompt: str) -> int:
    """Solved examples in a built prompt: every "\\nAnswer:" but the last one closes an example."""
    return prompt.count("\nAnswer:") - 1


def read_qlora_json(path: str | Path) -> list[Item]:
    """QLoRA's data/mmlu files: JSON lines (as qlora.py's `load_dataset("json")` reads them) or one JSON array.

    Raises:
        DataError: missing file, a line that does not parse, a record without subject/input/output, or an
            output that is not A-D; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mmlu.path: no such file: {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataError(f"mmlu.path: cannot parse {path}:{e.lineno}: {e.msg}") from None
        where = "record"
    else:
        records, where = [], "line"
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"mmlu.path: cannot parse {path}:{lineno}: {e.msg}") from None
    items = []
    for n, r in records:
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("subject", "input", "output")):
            raise DataError(f"mmlu.path: {path}: {where} {n} needs string fields subject, input and output")
        if r["output"] not in CHOICES:
            raise DataError(f"mmlu.path: {path}: {where} {n} has output {r['output']!r}; expected one of A, B, C, D")
        items.append(Item(r["subject"], r["input"], r["output"], infer_k(r["input"])))
    if not items:
        raise DataError(f"mmlu.path: {path} holds no questions")
    return items


def format_qlora_json(items: Sequence[Item]) -> str:
    """Items as QLoRA's data/mmlu files hold them: one `{"subject", "input", "output"}` object a line, ASCII
    escapes (`json.dumps`' defaults), each line ending in a newline."""
    return "".join(json.dumps({"subject": it.subject, "input": it.prompt, "output": it.answer}) + "\n" for it in items)


def read_csv_questions(path: Path, subject: str) -> list[Question]:
    """One subject's CSV (header-less question,A,B,C,D,answer); errors name the file and line."""
    questions = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            if len(row) != 6 or row[5] not in CHOICES:
                raise DataError(
                    f"mmlu.path: {path}:{reader.line_num}: expected question,A,B,C,D,answer with answer A-D, "
                    f"got {len(row)} fields"
                )
            questions.append(Question(subject, row[0], tuple(row[1:5]), row[5]))
    return questions


def read_csv_folder(root: str | Path, split: str) -> tuple[list[Question], dict[str, list[Question]]]:
    """The split's questions (subjects sorted, as Hendrycks' evaluate.py iterates them) and the dev questions."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"mmlu.path: {str(root)!r} has no {split}/ folder (expected <path>/{{dev,val,test}}/*.csv)")
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise DataError(f"mmlu.path: no <subject>_{split}.csv files in {folder}")
    questions, dev = [], {}
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        questions += read_csv_questions(f, subject)
        dev_file = root / "dev" / f"{subject}_dev.csv"
        dev[subject] = read_csv_questions(dev_file, subject) if dev_file.is_file() else []
    return questions, dev


def hub_questions(rows: Any) -> list[Question]:
    """`cais/mmlu` rows (question, subject, choices, answer index) -> questions, grouped by subject in sorted
    order and in the dataset's order within a subject (the CSV files' order)."""
    out = [Question(r["subject"], r["question"], tuple(r["choices"]), CHOICES[int(r["answer"])]) for r in rows]
    return sorted(out, key=lambda q: q.subject)  # stable: keeps the order within a subject


def read_hub(name: str, split: str) -> tuple[list[Question], dict[str, list[Question]]]:
    """The split and the dev questions of a hub dataset laid out as `cais/mmlu` (needs the hub)."""
    import datasets

    def load(s: str) -> list[Question]:
        return hub_questions(datasets.load_dataset(name, "all", split=HUB_SPLITS[s]))

    dev: dict[str, list[Question]] = {}
    for q in load("dev"):
        dev.setdefault(q.subject, []).append(q)
    return load(split), dev
