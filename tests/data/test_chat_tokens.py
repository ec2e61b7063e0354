"""Per-turn masking through the chat template, against hand-built token sequences: the labels cover exactly the
assistant answers and their end-of-turn tokens, padded and packed, for every train_on mode; on the tiny model
(the built-in ChatML default with generation markers, and a template without them) and on SmolLM2's template."""

import pytest
import torch

from lightning_qpeft.base_models.tokenizer import load_tokenizer
from lightning_qpeft.core.tokens import IGNORE_INDEX
from lightning_qpeft.data.chat_tokens import CHATML
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.data.sources import DataError
from tests.conftest import write_jsonl

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_NO_MARKERS = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: name a colour."}, {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": f"Blue, number {i}."},
            {"role": "user", "content": "And a last one"}, {"role": "assistant", "content": "Green is my last answer."}]


def expected(tok, messages, system, bos, eot, train_on="all"):
    """(input_ids, labels) written out by hand: ChatML text pieces, the answers + end-of-turn trained."""
    pieces = [(f"{bos}<|im_start|>system\n{system}{eot}\n", False)]
    answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k, m in enumerate(messages):
        if m["role"] == "user":
            pieces.append((f"<|im_start|>user\n{m['content']}{eot}\n<|im_start|>assistant\n", False))
        else:
            pieces.append((f"{m['content']}{eot}", train_on == "all" or k == answers[-1]))
            pieces.append(("\n", False))
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def chat_data(model_dir, tmp_path, n=3, **kw):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(n)])
    dm = NLGDataModule(model_dir, task="file", path=path, val_path=path, batch_size=n, **kw)
    dm.setup("fit")
    return dm


CASES = [("tiny", CHATML), ("tiny", CHATML_NO_MARKERS), ("smollm2", None)]


@pytest.fixture(params=CASES, ids=["tiny-chatml-markers", "tiny-chatml-no-markers", "smollm2"])
def model(request):
    name, template = request.param
    folder = request.getfixturevalue("tiny_model_dir" if name == "tiny" else "smollm2_dir")
    if name == "tiny":  # the tiny tokenizer: BOS written in front, EOS closes every turn, system only when given
        return folder, template, "Be brief.", "<s>", "</s>"
    return folder, template, None, "", "<|im_end|>"  # SmolLM2: its template writes its own system prompt


@pytest.mark.parametrize("train_on", ["all", "last"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_labels_are_exactly_the_answers_and_their_end_of_turn(model, tmp_path, train_on, packing):
    folder, template, system, bos, eot = model
    dm = chat_data(folder, tmp_path, chat_template=template, system_prompt=system, train_on=train_on, packing=packing)
    tok = dm.tokenizer
    want = {}
    for i in range(3):
        ids, labels = expected(tok, conversation(i), system or SMOL_SYSTEM, bos, eot, train_on)
        want[tuple(ids)] = labels
        assert sum(x != IGNORE_INDEX for x in labels) > 0
    rows = {tuple(r["input_ids"]): r["labels"] for r in dm.tokenized["train"]}
    assert rows == want
    batch = next(iter(dm.train_dataloader()))
    if packing:
        assert batch["input_ids"].shape[0] == 1
        records = torch.split(batch["input_ids"][0], [len(k) for k in
                                                      _order(batch["input_ids"][0].tolist(), want)])
        labels = torch.split(batch["labels"][0], [len(r) for r in records])
        for ids, lab in zip(records, labels):
            assert lab.tolist() == [IGNORE_INDEX] + want[tuple(ids.tolist())][1:]
    else:
        for ids, lab, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(mask.sum())
            assert lab[:n].tolist() == want[tuple(ids[:n].tolist())]
            assert (lab[n:] == IGNORE_INDEX).all()
    eot_id = tok.convert_tokens_to_ids(eot)
    for labels in want.values():  # every trained run ends with the end-of-turn token
        runs = _runs(labels)
        assert len(runs) == (3 if train_on == "all" else 1) and all(r[-1] == eot_id for r in runs)


def _order(flat: list[int], want: dict) -> list[tuple]:
    """The records a packed row holds, in order."""
    out, at = [], 0
    while at < len(flat):
        key = next(k for k in want if tuple(flat[at:at + len(k)]) == k)
        out.append(key)
        at += len(key)
    return out


def _runs(labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for x in labels + [IGNORE_INDEX]:
        if x != IGNORE_INDEX:
            cur.append(x)
        elif cur:
            runs.append(cur)
            cur = []
    return runs


def test_smollm2_turns_tokenize_as_the_whole_text_does(smollm2_dir, tmp_path):
    dm = chat_data(smollm2_dir, tmp_path)
    tok = dm.tokenizer
    for i, row in enumerate(dm.tokenized["train"]):
        text = tok.apply_chat_template(conversation(i), tokenize=False)
        assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_train_on_source_trains_every_token(tiny_model_dir, tmp_path):
    dm = chat_data(tiny_model_dir, tmp_path, chat_template="chatml", train_on_source=True)
    assert all(r["labels"] == r["input_ids"] for r in dm.tokenized["train"])


@pytest.mark.parametrize("train_on, kept", [("all", slice(0, 4)), ("last", slice(2, 6))])
def test_a_cut_conversation_keeps_whole_exchanges(tiny_model_dir, tmp_path, train_on, kept):
    tok = load_tokenizer(tiny_model_dir)
    two = expected(tok, conversation(0)[kept], "Be brief.", "<s>", "</s>", train_on)
    budget = len(two[0]) + 2  # two exchanges fit, three do not
    dm = chat_data(tiny_model_dir, tmp_path, n=1, chat_template="chatml", system_prompt="Be brief.",
                   train_on=train_on, source_max_len=budget - 1, target_max_len=1)
    row = dm.tokenized["train"][0]
    assert (row["input_ids"], row["labels"]) == two and row["truncated"]
    assert all(run[-1] == tok.eos_token_id for run in _runs(row["labels"]))  # no half-trained turn


def test_a_conversation_whose_first_exchange_does_not_fit_is_dropped_with_its_row(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": conversation(0)}] * 2 + [{"messages": [
        {"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}])
    dm = NLGDataModule(tiny_model_dir, task="file", path=path, val_path=path, chat_template="chatml",
                       source_max_len=100, target_max_len=28)
    with pytest.warns(UserWarning, match=r"dropped 1 record.*long.jsonl rows \[3\]"):
        dm.setup("fit")
    assert len(dm.tokenized["train"]) == 2


def test_single_turn_records_under_the_chat_template_end_with_the_end_of_turn(smollm2_dir, alpaca_file):
    dm = NLGDataModule(smollm2_dir, task="alpaca", path=alpaca_file, val_size=2, template="chat",
                       system_prompt="Answer in one word.")
    dm.setup("fit")
    record, row = dm.records["train"][0], dm.tokenized["train"][0]
    user = "\n\n".join(x for x in (record["instruction"], record["input"]) if x)
    tok = dm.tokenizer
    prompt = (f"<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert tok.decode(row["input_ids"]) == f"{prompt}{record['output']}<|im_end|>\n"
    answer = tok(f"{record['output']}<|im_end|>", add_special_tokens=False)["input_ids"]
    assert _runs(row["labels"]) == [answer]
    assert dm.prompts("validation")[0]["prompt"].startswith("<|im_start|>system\nAnswer in one word.")


def test_generation_prompts_end_before_the_last_answer(smollm2_dir, tmp_path):
    dm = chat_data(smollm2_dir, tmp_path)
    p = dm.prompts("validation")[1]
    text = dm.tokenizer.apply_chat_template(conversation(1)[:-1], tokenize=False, add_generation_prompt=True)
    assert p["prompt"] == text and p["input_ids"] == dm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert p["references"] == ["Green is my last answer."]


def test_generation_block_without_the_end_of_turn_still_trains_it(tiny_model_dir, tmp_path):
    outside = CHATML.replace("{{ message['content'] + eos_token }}{% endgeneration %}",
                             "{{ message['content'] }}{% endgeneration %}{{ eos_token }}")
    assert outside != CHATML
    a = chat_data(tiny_model_dir, tmp_path, chat_template=outside, system_prompt="Be brief.")
    b = chat_data(tiny_model_dir, tmp_path, chat_template="chatml", system_prompt="Be brief.")
    assert a.tokenized["train"]["labels"] == b.tokenized["train"]["labels"]


UNSPLITTABLE = [
    ("ignores add_generation_prompt",
     "{% for m in messages %}{{ m['role'] }}: {{ m['content'] + eos_token }}{% endfor %}",
     "add_generation_prompt adds nothing"),
    ("writes the last turn differently",
     "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [last]{% endif %}{{ eos_token }}"
     "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
     "the template writes earlier turns differently once later ones follow"),
    ("no end-of-turn token",
     "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}assistant: {% endif %}",
     "writes no special token after an assistant answer"),
    ("raises", "{{ raise_exception('only single turns') }}", "the chat template fails on it"),
]


@pytest.mark.parametrize("template, match", [u[1:] for u in UNSPLITTABLE], ids=[u[0] for u in UNSPLITTABLE])
def test_a_template_that_cannot_be_split_is_refused_with_the_reason(tiny_model_dir, tmp_path, template, match):
    with pytest.raises(DataError, match=f"data.chat_template: .*{match}"):
        chat_data(tiny_model_dir, tmp_path, chat_template=template)


def test_no_chat_template_is_refused_unless_chatml_is_asked_for(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match=r"the tokenizer has no chat template.*set data.chat_template to chatml"):
        chat_data(tiny_model_dir, tmp_path)


@pytest.mark.parametrize("kw, match", [(dict(train_on="every"), r"data.train_on: 'every'; use all .* or last"),
                                       (dict(chat_template="nope.jinja"), r"data.chat_template: 'nope.jinja' is neither")])
def test_bad_chat_keys_are_refused_at_construction(tiny_model_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        NLGDataModule(tiny_model_dir, **kw)


def test_conversations_under_a_single_prompt_template_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match=r"data.template: 'alpaca' renders single prompts.*unset data.template"):
        chat_data(tiny_model_dir, tmp_path, template="alpaca", chat_template="chatml")


def test_a_template_that_refuses_system_turns_trains_without_them_and_names_the_record_with_one(tiny_model_dir,
                                                                                                 tmp_path):
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}" + CHATML)
    dm = chat_data(tiny_model_dir, tmp_path, chat_template=no_system)
    assert len(_runs(dm.tokenized["train"][0]["labels"])) == 3
    with pytest.raises(DataError, match=r"chat.jsonl: line 1: the chat template fails on it .*System role not supported"):
        chat_data(tiny_model_dir, tmp_path, chat_template=no_system, system_prompt="Be brief.")
