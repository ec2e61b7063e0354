"""The batched MMLU scorer equals a slow reference (one unpadded forward per question) on the tiny 4-bit model,
for right and left padding and odd batch sizes; letter tokens are QLoRA's; the batch plan keeps its budget."""

import peft
import pytest
import torch

from lightning_qpeft.base_models.tokenizer import load_tokenizer
from lightning_qpeft.evaluation.mmlu import MMLUEvaluator
from lightning_qpeft.evaluation.mmlu_scoring import encode_prompts, letter_token_ids, plan_batches
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.tasks import synthetic_mc
from lightning_qpeft.tasks.mmlu_prompt import build_items
from tests.conftest import SHARED_DATA

LLAMA2 = SHARED_DATA / "tokenizers" / "llama2"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def items():
    """13 questions of all subjects with 0 to 5 solved examples: prompt lengths from ~70 to ~330 tokens."""
    dev = {}
    for q in synthetic_mc.questions("dev", 5):
        dev.setdefault(q.subject, []).append(q)
    questions = synthetic_mc.questions("val", 4)[:13]
    return [build_items([q], dev, shots=i % 6)[0] for i, q in enumerate(questions)]


def reference(model, tokenizer, items, letter_ids):
    """One forward per question, no padding, no position ids: logits of the last position at the four letters."""
    rows = []
    with torch.no_grad():
        for it in items:
            ids = tokenizer(tokenizer.bos_token + it.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            rows.append(model(input_ids=ids).logits[0, -1, letter_ids].float())
    return torch.stack(rows)


def check_against_reference(model, tokenizer, items, ref=None, **kw):
    evaluator = MMLUEvaluator(items, tokenizer, **kw)
    results = evaluator.evaluate(model.eval())
    ref = reference(model, tokenizer, items, evaluator.letter_ids) if ref is None else ref
    torch.testing.assert_close(results.scores[:, :4], ref, rtol=0, atol=2e-4)
    assert results.predictions == ["ABCD"[i] for i in ref.argmax(1).tolist()]
    ref_acc = sum(p == it.answer for p, it in zip(results.predictions, items)) / len(items)
    assert results.metrics()["mmlu/accuracy"] == ref_acc
    return evaluator


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    base = load_base_model(tiny_model_dir, "nf4-dq", compute_dtype="float32")
    # a LoRA with random B, so the adapter path (PeftModel forwarding logits_to_keep) is what is scored
    return peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()


@pytest.fixture(scope="module")
def lora_reference(lora_model, tokenizer, items):
    return reference(lora_model, tokenizer, items, letter_token_ids(tokenizer))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_size, batch_tokens", [(4, 100_000), (5, 700)])
def test_batched_scores_equal_question_by_question_reference(lora_model, lora_reference, tokenizer, items,
                                                             padding_side, batch_size, batch_tokens):
    evaluator = check_against_reference(lora_model, tokenizer, items, lora_reference, padding_side=padding_side,
                                        batch_size=batch_size, batch_tokens=batch_tokens)
    sizes = sorted(len(b) for b in evaluator.batches)
    assert sum(sizes) == 13 and sizes[0] < batch_size  # an odd-sized batch is among them
    if batch_tokens == 700:
        assert len(set(sizes)) > 2  # the token budget, not the row cap, shaped the batches


def test_prompt_tuning_is_scored_on_the_input_positions(tiny_model_dir, tokenizer, items):
    base = load_base_model(tiny_model_dir, "nf4-dq", compute_dtype="float32")
    model = peft.get_peft_model(base, peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    # left padding would sit between the virtual tokens and the prompt: the scorer pads such models on the right
    check_against_reference(model, tokenizer, items, padding_side="left", batch_size=4)


def test_letter_tokens_are_qlora_s(tokenizer):
    ids = letter_token_ids(tokenizer, "qlora")
    assert tokenizer.convert_ids_to_tokens(ids) == ["A", "B", "C", "D"]  # byte-level BPE: the bare letters
    # the tiny tokenizer splits " A" after "Answer:" into "Ġ", "A": no single continuation token
    with pytest.raises(ValueError, match="mmlu.letter_tokens: continuation"):
        letter_token_ids(tokenizer, "continuation")


@pytest.mark.skipif(not LLAMA2.is_dir(), reason="no ../shared/data")
def test_llama2_letters_are_the_tokens_after_answer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(LLAMA2))
    # SentencePiece's "▁A" (319): QLoRA's tokenizer("A")[0] is the token that follows "Answer:" in "Answer: A"
    assert letter_token_ids(tokenizer, "qlora") == letter_token_ids(tokenizer, "continuation") == [319, 350, 315, 360]


@pytest.mark.skipif(not LLAMA2.is_dir(), reason="no ../shared/data")
def test_llama2_prompts_start_as_qlora_s_slow_tokenizer_starts_them():
    from transformers import AutoTokenizer, LlamaTokenizerFast

    for cls in (AutoTokenizer, LlamaTokenizerFast):  # the fast one reads "<s>The" as [1, 1576 "The"]
        (ids,), cut = encode_prompts(cls.from_pretrained(str(LLAMA2)), ["The following are"], max_length=2048)
        assert ids == [1, 450, 1494, 526] and cut == 0  # BOS, "▁The", "▁following", "▁are"
    (ids,), cut = encode_prompts(AutoTokenizer.from_pretrained(str(LLAMA2)), ["The following are"], max_length=3)
    assert ids == [450, 1494, 526] and cut == 1  # an over-long prompt keeps its end


def test_batch_plan_keeps_the_budget_and_every_question_once():
    lengths = [5, 50, 7, 300, 12, 12, 48, 3, 1000, 60]
    batches = plan_batches(lengths, batch_tokens=120, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [8] and batches[1] == [3]  # longest first; over-budget prompts alone
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 120)
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_ranks_score_disjoint_shares_that_add_up_to_the_whole(lora_model, lora_reference, tokenizer, items):
    evaluator = MMLUEvaluator(items, tokenizer, batch_size=3)
    shares = [evaluator.evaluate(lora_model, rank=r, world_size=2, all_reduce_sum=lambda t: t).scores for r in (0, 1)]
    scored = [set(torch.nonzero(s.abs().sum(1)).flatten().tolist()) for s in shares]
    assert scored[0] and scored[1] and not scored[0] & scored[1] and scored[0] | scored[1] == set(range(len(items)))
    # what DDP's all-reduce (a sum) gives every rank: every question's scores, once
    summed = evaluator.evaluate(lora_model, rank=0, world_size=2, all_reduce_sum=lambda t: t + shares[1]).scores
    torch.testing.assert_close(summed[:, :4], lora_reference, rtol=0, atol=2e-4)
