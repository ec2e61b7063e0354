"""The synthetic multiple-choice task: disjoint splits, balanced letters, single-token options, and training
records that are token for token what the MMLU scorer reads (prompt) and scores (the letter)."""

from collections import Counter

import pytest

from lightning_qpeft.base_models.tokenizer import load_tokenizer
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.evaluation.mmlu_scoring import encode_prompts, letter_token_ids
from lightning_qpeft.tasks import synthetic_mc
from lightning_qpeft.tasks.mmlu_prompt import build_prompt


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
    for _, answers, distractors in synthetic_mc.KINDS.values():
        for word in answers + distractors:
            assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


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
        n = next(i for i, x in enumerate(row["labels"]) if x != -100)  # the prompt is masked: source length
        assert row["input_ids"][:n] == scored  # BOS + prompt, the scorer's tokens
        assert row["input_ids"][n] == letters["ABCD".index(q.answer)]  # the trained token is the scored one
        assert row["labels"][n:] == row["input_ids"][n:] and row["input_ids"][n + 1] == tok.eos_token_id


@pytest.mark.slow
def test_a_fit_on_the_task_lifts_held_out_accuracy_from_chance(tiny_model_dir, tmp_path):
    """The task trains what the MMLU scorer measures: a QLoRA fit lifts held-out synthetic questions (a split
    never trained on) from chance (25 %) to far above it. Slow: the tiny model first has to learn to bind an
    option to its letter, which takes a few hundred steps before accuracy moves at all."""
    import lightning
    import peft
    import torch

    from lightning_qpeft.callbacks import MMLUEvaluation
    from lightning_qpeft.model.module import QPeftModule
    from tests.conftest import cpu_trainer

    lightning.seed_everything(0)
    dm = NLGDataModule(tiny_model_dir, task="synthetic-mc", batch_size=32, source_max_len=128, target_max_len=2)
    module = QPeftModule(tiny_model_dir, quantization="nf4-dq", compute_dtype="float32",
                         adapter=peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0))
    mmlu = MMLUEvaluation(enabled=True, source="synthetic", split="test", shots=0, at_fit_start=True)
    accuracy = []  # at step 0, then after every 100 steps (the callbacks run in order: mmlu's result is there)
    read = lambda *_: accuracy.append(mmlu.last_results.metrics()["mmlu/accuracy"])  # noqa: E731
    record = lightning.pytorch.callbacks.LambdaCallback(on_train_start=read, on_validation_epoch_end=read)
    cpu_trainer(max_steps=600, val_check_interval=100, check_val_every_n_epoch=None, limit_val_batches=1,
                default_root_dir=tmp_path, callbacks=[mmlu, record]).fit(module, dm)
    assert (tmp_path / "mmlu_test.json").is_file()  # the report of the last evaluation, beside the logs
    print("mmlu/accuracy every 100 steps:", accuracy)
    assert mmlu.last_results is not None and mmlu.last_step == 600
    assert accuracy[0] < 0.4 and max(accuracy) > 0.8 and accuracy[-1] > 0.8, accuracy


def test_a_short_fit_moves_the_scored_answers_to_the_trained_letters(tiny_model_dir):
    """Fast twin of the test above: 32 questions fitted for a few epochs are then answered as trained by the
    scorer (the prompt and the letter token the task trains are the ones the scorer reads and compares)."""
    import lightning
    import peft
    import torch

    from lightning_qpeft.evaluation.mmlu import MMLUEvaluator
    from lightning_qpeft.model.module import QPeftModule
    from lightning_qpeft.tasks.mmlu_prompt import Item
    from tests.conftest import cpu_trainer

    lightning.seed_everything(0)
    dm = NLGDataModule(tiny_model_dir, task="synthetic-mc", batch_size=8, source_max_len=128, target_max_len=2,
                       max_train_records=32)
    dm.setup("fit")
    items = [Item("trained", r["input"], r["output"]) for r in dm.records["train"]]
    module = QPeftModule(tiny_model_dir, quantization="nf4-dq", compute_dtype="float32",
                         adapter=peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))
    module.configure_model()
    evaluator = MMLUEvaluator(items, dm.tokenizer)
    before = evaluator.evaluate(module.model).metrics()["mmlu/accuracy"]
    cpu_trainer(max_steps=150, limit_val_batches=0).fit(module, dm)
    after = evaluator.evaluate(module.model).metrics()["mmlu/accuracy"]
    assert before < 0.45 and after >= 0.75, (before, after)
