"""ROUGE/BLEU equal hand-computed values, and E2E scoring uses every reference."""

import math

import pytest

from lightning_qpeft.evaluation.generation import score_generations


def test_rouge_and_bleu_equal_hand_computed_values():
    # ROUGE: pred "the cat sat on the mat" vs "the cat is on the mat": 5 of 6 unigrams match (F 5/6), 3 of 5
    # bigrams (the cat, on the, the mat: F 3/5), longest common subsequence 5 words (F 5/6)
    s = score_generations(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert s["rouge1"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    assert s["rouge2"] == pytest.approx(100 * 3 / 5, abs=1e-3)
    assert s["rougeL"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    # corpus BLEU over two sentences: clipped n-gram matches are summed over the corpus before the ratio.
    # "a b c d e f" vs "a b c d e g": 5/6, 4/5, 3/4, 2/3 matches; "the cat" vs "the cat": 2/2, 1/1, -, -.
    s = score_generations(["a b c d e f", "the cat"], [["a b c d e g"], ["the cat"]])
    precisions = [(5 + 2) / (6 + 2), (4 + 1) / (5 + 1), 3 / 4, 2 / 3]
    bleu = 100 * math.exp(sum(math.log(p) for p in precisions) / 4)  # equal lengths: brevity penalty 1
    assert s["bleu"] == pytest.approx(bleu, abs=1e-6)


def test_multi_reference_scoring_uses_every_reference():
    pred = ["aromi is an italian restaurant in the city centre"]
    first_only = score_generations(pred, [["there is a place called aromi that serves italian food"]])
    refs = [["there is a place called aromi that serves italian food",
             "aromi is an italian restaurant in the city centre"]]
    both = score_generations(pred, refs)
    assert both["bleu"] == pytest.approx(100.0) and both["rougeL"] == pytest.approx(100.0)
    assert first_only["bleu"] < 20 and first_only["rougeL"] < 60
    # a prompt with fewer references than another is fine (sacrebleu skips the missing ones)
    mixed = score_generations(pred * 2, [refs[0], refs[0][:1]])
    assert first_only["bleu"] < mixed["bleu"] < 100


def test_scoring_refuses_mismatched_input():
    with pytest.raises(ValueError, match="2 predictions for 1 reference sets"):
        score_generations(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        score_generations(["a"], [[]])
