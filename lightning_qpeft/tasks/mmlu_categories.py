"""MMLU's 57 subjects -> subcategory -> the four categories, as Hendrycks' `categories.py` defines them.

Category accuracy is the mean over the category's questions (Hendrycks concatenates the per-question results
of its subjects), not the mean of its subjects' accuracies. The synthetic subjects of
`lightning_qpeft.tasks.synthetic_mc` carry their own category so the offline run exercises the same path.
Metric names: `mmlu/category/{stem,humanities,social_sciences,other}`.
"""

from __future__ import annotations

from typing import Optional

from lightning_qpeft.tasks.synthetic_mc import SUBJECT_SUBCATEGORIES

SUBCATEGORIES: dict[str, str] = {
    "abstract_algebra": "math",
    "anatomy": "health",
    "astronomy": "physics",
    "business_ethics": "business",
    "clinical_knowledge": "health",
    "college_biology": "biology",
    "college_chemistry": "chemistry",
    "college_computer_science": "computer science",
    "college_mathematics": "math",
    "college_medicine": "health",
    "college_physics": "physics",
    "computer_security": "computer science",
    "conceptual_physics": "physics",
    "econometrics": "economics",
    "electrical_engineering": "engineering",
    "elementary_mathematics": "math",
    "formal_logic": "philosophy",
    "global_facts": "other",
    "high_school_biology": "biology",
    "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science",
    "high_school_european_history": "history",
    "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math",
    "high_school_microeconomics": "economics",
    "high_school_physics": "physics",
    "high_school_psychology": "psychology",
    "high_school_statistics": "math",
    "high_school_us_history": "history",
    "high_school_world_history": "history",
    "human_aging": "health",
    "human_sexuality": "culture",
    "international_law": "law",
    "jurisprudence": "law",
    "logical_fallacies": "philosophy",
    "machine_learning": "computer science",
    "management": "business",
    "marketing": "business",
    "medical_genetics": "health",
    "miscellaneous": "other",
    "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy",
    "nutrition": "health",
    "philosophy": "philosophy",
    "prehistory": "history",
    "professional_accounting": "other",
    "professional_law": "law",
    "professional_medicine": "health",
    "professional_psychology": "psychology",
    "public_relations": "politics",
    "security_studies": "politics",
    "sociology": "culture",
    "us_foreign_policy": "politics",
    "virology": "health",
    "world_religions": "philosophy",
}

# Hendrycks' names, and the metric-path names used here
CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other (business, health, misc.)": ("other", "business", "health"),
}
METRIC_NAMES: dict[str, str] = {
    "STEM": "stem",
    "humanities": "humanities",
    "social sciences": "social_sciences",
    "other (business, health, misc.)": "other",
}
_CATEGORY_OF_SUBCATEGORY = {sub: cat for cat, subs in CATEGORIES.items() for sub in subs}


def category_of(subject: str) -> Optional[str]:
    """Hendrycks' category of a subject (real or synthetic); None for a subject no table knows."""
    sub = SUBCATEGORIES.get(subject, SUBJECT_SUBCATEGORIES.get(subject))
    return _CATEGORY_OF_SUBCATEGORY.get(sub) if sub is not None else None
