"""MMLU prompts: Hendrycks' format with its quirks, the k-limit, and QLoRA's files rebuilt byte for byte from the
repository's CSVs (data/mmlu) with the LLaMA-2 tokenizer (QLoRA's files and the tokenizer are in ../shared/data;
skipped when it is absent)."""

from pathlib import Path

import pytest

from lightning_qpeft.evaluation.mmlu_data import format_qlora_json, read_qlora_json, token_counter
from lightning_qpeft.evaluation.mmlu_sources import load_items
from lightning_qpeft.tasks.mmlu_prompt import Question, build_items, build_prompt, format_subject
from tests.conftest import SHARED_DATA

MMLU = SHARED_DATA / "mmlu"
RAW = Path(__file__).resolve().parents[2] / "data" / "mmlu"
LLAMA2 = SHARED_DATA / "tokenizers" / "llama2"
needs_shared = pytest.mark.skipif(not (MMLU.is_dir() and LLAMA2.is_dir()),
                                  reason="no ../shared/data (QLoRA's MMLU files and the LLaMA-2 tokenizer)")

DEV = [Question("high_school_physics", f"Dev question {i}?", ("w", "x", "y", "z"), "ABCD"[i % 4]) for i in range(5)]
Q = Question("high_school_physics", "What falls faster?", ("a feather", "a stone", "both", "None"), "C")


def test_subject_gets_hendrycks_leading_space():
    assert format_subject("abstract_algebra") == " abstract algebra"
    assert format_subject("virology") == " virology"


def test_prompt_is_hendrycks_format_exactly():
    assert build_prompt(Q, DEV, 2) == (
        "The following are multiple choice questions (with answers) about  high school physics.\n\n"
        "Dev question 0?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
        "Dev question 1?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
        "What falls faster?\nA. a feather\nB. a stone\nC. both\nD. None\nAnswer:"
    )


def test_k_is_lowered_until_the_prompt_fits():
    chars = lambda texts: [len(t) for t in texts]  # a "tokenizer" counting characters
    full = len(build_prompt(Q, DEV, 5))
    fits_3 = len(build_prompt(Q, DEV, 3))
    items = build_items([Q, Q], {Q.subject: DEV}, 5, chars, fits_3)
    assert [it.k for it in items] == [3, 3] and all(len(it.prompt) <= fits_3 < full for it in items)
    assert build_items([Q], {Q.subject: DEV}, 5, chars, 10)[0].k == 0  # never below zero-shot
    assert build_items([Q], {Q.subject: DEV}, 5, chars, full)[0].k == 5


def test_too_few_dev_questions_is_refused():
    with pytest.raises(ValueError, match="mmlu.shots: 5 .* 'high_school_physics' has 2 dev"):
        build_items([Q], {Q.subject: DEV[:2]}, 5)


def _lines(items):
    return format_qlora_json(items).splitlines()


@needs_shared
@pytest.mark.parametrize("split", ["val", "test"])
def test_zero_shot_files_are_rebuilt_byte_for_byte(split):
    items = load_items("csv", None, str(RAW), split, shots=0, max_prompt_tokens=None)
    assert _lines(items) == (MMLU / f"zero_shot_mmlu_{split}.json").read_text(encoding="utf-8").splitlines()


@needs_shared
def test_five_shot_val_is_rebuilt_byte_for_byte_with_llama2_at_2048():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(LLAMA2))
    items = load_items("csv", tokenizer, str(RAW), "val", shots=5, max_prompt_tokens=2048)
    assert _lines(items) == (MMLU / "five_shot_mmlu_val.json").read_text(encoding="utf-8").splitlines()
    # the k the file's prompts were built with, read back from the file
    assert [it.k for it in items] == [it.k for it in read_qlora_json(MMLU / "five_shot_mmlu_val.json")]
    assert sum(it.k < 5 for it in items) == 56
    assert max(token_counter(tokenizer)([it.prompt for it in items])) <= 2048


@needs_shared
@pytest.mark.slow
def test_five_shot_test_is_rebuilt_byte_for_byte_with_llama2_at_2048():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(LLAMA2))
    items = load_items("csv", tokenizer, str(RAW), "test", shots=5, max_prompt_tokens=2048)
    assert _lines(items) == (MMLU / "five_shot_mmlu_test.json").read_text(encoding="utf-8").splitlines()
