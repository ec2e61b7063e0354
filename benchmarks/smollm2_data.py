"""Write the SmolLM2 study's data files (bench_data/smollm2/, git-ignored) from ../shared/data.

    python benchmarks/smollm2_data.py [--shared ../shared/data] [--out bench_data/smollm2]

The files are licence-restricted (SAMSum CC BY-NC-ND, E2E CC BY-SA, Alpaca CC BY-NC): they are read from the
shared folder and written outside git, never committed. What the study trains and tests on:

- SAMSum: ../shared has only the validation (818) and test (819) dialogues, so training is the validation set
  plus the first 582 test dialogues (1,400), and the test split is the other 237.
- E2E NLG: training is the dev set's (MR, reference) pairs (4,672 rows, 547 MRs), the test split is the real
  test set with all references (testset_w_refs.csv: 630 MRs).
- Alpaca: the first 1,400 records of alpaca_5000.json (the next 100 are its test split); MMLU scores it
  (data/mmlu, built by `python -m lightning_qpeft fetch mmlu`).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMSUM_TRAIN_FROM_TEST = 582  # 818 validation + 582 test dialogues = 1,400 training records; 237 test


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "bench_data" / "smollm2"))
    args = parser.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    samsum = shared / "summarization" / "samsum"
    val, test = _rows(samsum / "val.csv"), _rows(samsum / "test.csv")
    pick = lambda rows: [{"dialogue": r["dialogue"], "summary": r["summary"]} for r in rows]  # noqa: E731
    _jsonl(out / "samsum_train.jsonl", pick(val + test[:SAMSUM_TRAIN_FROM_TEST]))
    _jsonl(out / "samsum_test.jsonl", pick(test[SAMSUM_TRAIN_FROM_TEST:]))

    e2e = shared / "data2text" / "e2e"
    shutil.copyfile(e2e / "devset.csv", out / "e2e_train.csv")
    shutil.copyfile(e2e / "testset_w_refs.csv", out / "e2e_test.csv")

    alpaca = json.loads((shared / "instruction" / "alpaca" / "alpaca_5000.json").read_text(encoding="utf-8"))
    (out / "alpaca_1400.json").write_text(json.dumps(alpaca[:1400], ensure_ascii=False), encoding="utf-8")
    (out / "alpaca_test.json").write_text(json.dumps(alpaca[1400:1500], ensure_ascii=False), encoding="utf-8")

    for f in sorted(out.iterdir()):
        print(f"{f}: {f.stat().st_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
