"""The synthetic multiple-choice task: disjoint splits, balanced letters, single-token options, and training
records that are token for token what the MMLU scorer reads (prompt) and scores (the letter)."""

from collections import Counter

from lightning_qpeft.data import synthetic_mc
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.evaluation.mmlu_prompt import build_prompt
from lightning_qpeft.evaluation.mmlu_scoring import encode_prompts, letter_token_ids
from lightning_qpeft.model.loading import load_tokenizer


def key(q):
    return q.question, tuple(sorted(q.choices))


def test_splits_are_disjoint_and_deterministic():
    splits = {s: synthetic_mc.questions(s, 40 if s != "dev" else 5) for s in ("train", "val", "test", "dev")}
    keys = {s: {key(q) for q in qs} for s, qs in splits.items()}
    for a in keys:
        for b in keys:
            assert a == b or not keys[a] & keys[b], (a, b)
    assert synthetic_mc.questions("test", 40) == splits["test"]
    assert synthetic_mc.questions("test", 40, seed=1) != splits["test"]  # another sample, same split rule
    assert all(synthetic_mc.split_of(q.question, q.choices) == "test" for q in synthetic_mc.questions("test", 40, 1))


def test_letters_are_balanced_and_each_question_has_one_right_option():
    qs = synthetic_mc.questions("train", 400)
    counts = Counter(q.answer for q in qs)
    assert set(counts) == set("ABCD") and min(counts.values()) > 0.2 * len(qs)
    every_answer = {a for _, answers, _ in synthetic_mc.KINDS.values() for a in answers}
    for q in qs:
        right = q.choices["ABCD".index(q.answer)]
        assert len(set(q.choices)) == 4
        # the other three options are of another kind: no answer of any subject among them
        assert right in synthetic_mc.KINDS[q.subject][1] and not (set(q.choices) - {right}) & every_answer, q


def test_options_are_single_tokens_of_the_tiny_tokenizer(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    words = synthetic_mc.FOODS + synthetic_mc.PRICE_WORDS + synthetic_mc.ARTICLES + synthetic_mc.OTHER_WORDS
    for w in words:
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    for d in synthetic_mc.EVEN_DIGITS + synthetic_mc.ODD_DIGITS:
        assert len(tok(d, add_special_tokens=False)["input_ids"]) == 1, d


def test_training_records_are_what_the_scorer_reads_and_scores(tiny_model_dir):
    dm = NLGDataModule(tiny_model_dir, task="synthetic-mc", source_max_len=128, target_max_len=2)
    dm.setup("fit")
    tok = dm.tokenizer
    letters = letter_token_ids(tok)
    questions = synthetic_mc.questions("val", 40, seed=dm.seed)
    assert len(dm.records["validation"]) == len(questions)
    for q, record, row in zip(questions, dm.records["validation"], dm.tokenized["validation"]):
        prompt = build_prompt(q, (), 0)
        assert record["input"] == prompt and record["output"] == q.answer
        (scored,), _ = encode_prompts(tok, [prompt], max_length=2048)
        n = row["source_len"]
        assert row["input_ids"][:n] == scored  # BOS + prompt, the scorer's tokens
        assert row["input_ids"][n] == letters["ABCD".index(q.answer)]  # the trained token is the scored one
        assert row["labels"][n:] == row["input_ids"][n:] and row["input_ids"][n + 1] == tok.eos_token_id
