"""MMLU metrics and report computed from per-question scores, checked against hand-computed values."""

import math

import pytest
import torch

from lightning_qpeft.evaluation.mmlu import MMLUResults
from lightning_qpeft.tasks.mmlu_prompt import Item


def results():
    # 3 subjects: virology (other: 2 of 3 right), anatomy (other: 0 of 1), formal_logic (humanities: 1 of 1)
    items = [Item("virology", "p", "A", 5), Item("virology", "p", "B", 5), Item("virology", "p", "C", 4),
             Item("anatomy", "p", "D", 5), Item("formal_logic", "p", "B", 3)]
    letter_logits = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 3.0, 0, 0], [1.0, 0, 0, 0], [0, 0.5, 0, 0]])
    vocab_logprobs = torch.log(torch.full((5, 4), 0.1))
    return MMLUResults(items, torch.cat([letter_logits, vocab_logprobs], 1), seconds=2.0, tokens=100)


def test_metrics_are_the_hand_computed_values():
    m = results().metrics()
    assert m["mmlu/accuracy"] == pytest.approx(3 / 5)  # question mean
    assert m["mmlu/accuracy_macro"] == pytest.approx((2 / 3 + 0 + 1) / 3)  # subject mean (QLoRA's)
    assert m["mmlu/virology"] == pytest.approx(2 / 3) and m["mmlu/anatomy"] == 0 and m["mmlu/formal_logic"] == 1
    assert m["mmlu/category/other"] == pytest.approx(2 / 4)  # questions of virology + anatomy
    assert m["mmlu/category/humanities"] == 1 and "mmlu/category/stem" not in m
    ce = [-math.log(math.exp(2) / (math.exp(2) + 3)), -math.log(math.e / (math.e + 3)),
          -math.log(1 / (math.exp(3) + 3)), -math.log(1 / (math.e + 3)), -math.log(math.exp(0.5) / (math.exp(0.5) + 3))]
    assert m["mmlu/loss"] == pytest.approx(sum(ce) / 5, rel=1e-5)
    assert m["mmlu/lm_loss"] == pytest.approx(-math.log(0.1), rel=1e-5)


def test_report_holds_subjects_categories_and_each_question_with_its_k():
    r = results().report(split="val")
    assert r["split"] == "val" and r["overall"]["questions"] == 5 and r["overall"]["subjects"] == 3
    assert r["subjects"]["virology"] == {"category": "other (business, health, misc.)", "questions": 3, "correct": 2,
                                         "k": {"4": 1, "5": 2}, "accuracy": pytest.approx(2 / 3)}
    assert r["categories"]["humanities"] == {"accuracy": 1.0, "questions": 1}
    assert r["k_histogram"] == {"3": 1, "4": 1, "5": 3}
    q = r["questions"][2]
    assert (q["subject"], q["k"], q["answer"], q["prediction"], q["correct"]) == ("virology", 4, "C", "B", False)
    assert sum(q["probs"]) == pytest.approx(1, abs=1e-4)
    assert r["timing"]["questions_per_s"] == 2.5
