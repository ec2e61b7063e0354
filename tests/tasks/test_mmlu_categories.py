"""Hendrycks' category mapping covers all 57 MMLU subjects (and the synthetic ones) with the four categories."""

from collections import Counter
from pathlib import Path

from lightning_qpeft.tasks.mmlu_categories import CATEGORIES, SUBCATEGORIES, category_of
from lightning_qpeft.tasks.synthetic_mc import SUBJECTS

MMLU = Path(__file__).resolve().parents[2] / "data" / "mmlu"


def test_every_subject_has_one_of_the_four_categories():
    assert len(SUBCATEGORIES) == 57
    counts = Counter(category_of(s) for s in SUBCATEGORIES)
    # Hendrycks' split of the 57 subjects
    assert counts == {"STEM": 18, "humanities": 13, "social sciences": 12, "other (business, health, misc.)": 14}
    assert set(counts) == set(CATEGORIES)
    assert {category_of(s) for s in SUBJECTS} == set(CATEGORIES)  # the synthetic set exercises all four
    assert category_of("not_a_subject") is None


def test_the_table_names_exactly_the_subjects_of_the_real_files():
    for split in ("dev", "val", "test"):
        files = {p.name[: -len(f"_{split}.csv")] for p in (MMLU / split).glob("*.csv")}
        assert files == set(SUBCATEGORIES)
