"""Tasks and files: each layout becomes canonical records, the template is reproduced exactly and exactly
the prompt tokens are masked. Every sample file is written by the test itself."""

import csv

import pytest

from lightning_qpeft.data.collate import IGNORE_INDEX
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.data.sources import TASKS, DataError
from lightning_qpeft.tasks.templates import get_template
from tests.conftest import SHARED_DATA, write_jsonl

DIALOGUES = [
    ("13818513", "Amanda: I baked cookies. Do you want some?\r\nJerry: Sure!\r\nAmanda: I'll bring you tomorrow :-)",
     "Amanda baked cookies and will bring Jerry some tomorrow."),
    ("13728867", "Olivia: Who are you voting for?\r\nOliver: Liberals as always.\r\nOlivia: Me too!!",
     "Olivia and Oliver are voting for liberals."),
    ("13681000", 'Tim: "Hi", he said, "NA"\r\nKim: None of that, please',
     "NA"),  # quotes, commas and texts that pandas would read as missing values
]


def write_samsum_csv(path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "summary", "dialogue"])
        for i, d, s in DIALOGUES:
            w.writerow([i, s, d])
    return str(path)


def write_e2e_csv(path):
    rows = [("name[Aromi], food[Italian]", "Aromi serves Italian food."),
            ("name[Aromi], food[Italian]", "Aromi is an Italian place."),
            ("name[Aromi], food[Italian]", "There is an Italian venue called Aromi."),
            ("name[Zizzi], area[riverside]", "Zizzi is by the riverside."),
            ("name[Zizzi], area[riverside]", "By the riverside, there is Zizzi.")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\r\n")  # devset.csv uses CRLF
        w.writerow(["mr", "ref"])
        w.writerows(rows)
    return str(path), rows


def check_tokens(dm, split="train", i=0):
    """input_ids = BOS + rendered template + output + EOS, labels mask exactly the prompt."""
    tok, record, row = dm.tokenizer, dm.records[split][i], dm.tokenized[split][i]
    prompt = tok.bos_token + dm.template.render(record, tok)
    source = tok(prompt, add_special_tokens=False)["input_ids"]
    target = tok(record["output"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == source + target
    assert row["labels"] == [IGNORE_INDEX] * len(source) + target
    assert tok.decode(row["input_ids"]) == prompt + record["output"] + tok.eos_token
    return prompt


def test_every_task_has_a_template_and_a_source():
    for task in TASKS.values():
        get_template(task.template)
        assert task.builtin or task.tokens or task.hub_id or task.name in ("file", "hub", "e2e-lora")


def test_alpaca_task_from_a_local_file(tiny_model_dir, alpaca_file):
    dm = NLGDataModule(tiny_model_dir, task="alpaca", path=alpaca_file, val_size=2)
    dm.setup("fit")
    assert dm.template.name == "alpaca"
    with_input = next(i for i in range(len(dm.records["train"])) if dm.records["train"][i]["input"])
    prompt = check_tokens(dm, i=with_input)
    assert "### Input:\n" in prompt and prompt.endswith("### Response: ")


def test_samsum_csv_with_crlf_dialogues(tiny_model_dir, tmp_path):
    path = write_samsum_csv(tmp_path / "samsum.csv")
    dm = NLGDataModule(tiny_model_dir, task="samsum", path=path, val_path=path, test_path=path)
    dm.setup("fit")
    recs = dm.records["validation"]
    assert len(recs) == 3 and recs[0]["instruction"] == ""
    assert recs[0]["input"] == DIALOGUES[0][1].replace("\r\n", "\n") and "\r" not in "".join(recs["input"])
    assert recs[2]["output"] == "NA" and recs[2]["references"] == ["NA"]
    prompt = check_tokens(dm, "validation", 1)
    assert prompt == "<s>Summarize the following text.\n\n" + DIALOGUES[1][1].replace("\r\n", "\n") + "\n\nSummary: "


def test_e2e_csv_trains_on_pairs_and_scores_against_all_references(tiny_model_dir, tmp_path):
    path, rows = write_e2e_csv(tmp_path / "devset.csv")
    dm = NLGDataModule(tiny_model_dir, task="e2e", path=path, val_path=path, test_path=path)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.records["train"]) == 5 and dm.records["train"][0]["references"] == [rows[0][1]]
    assert dm.records["test"][0]["references"] == [r for m, r in rows if m == rows[0][0]]
    prompts = dm.prompts("test")
    assert len(prompts) == 2 and [len(r) for r in prompts["references"]] == [3, 2]
    assert check_tokens(dm, "test").endswith("Meaning representation: name[Aromi], food[Italian]\nDescription: ")


def test_e2e_lora_text_form(tiny_model_dir, tmp_path):
    lines = ["name : Aromi | food : Italian||Aromi serves Italian food . ",
             "name : Aromi | food : Italian||Aromi is Italian . ",
             "name : Zizzi | area : riverside||Zizzi is by the riverside . "]
    path = tmp_path / "valid.txt"
    path.write_text("\n".join(lines) + "\n")
    dm = NLGDataModule(tiny_model_dir, task="e2e-lora", path=str(path), val_path=str(path))
    dm.setup("fit")
    rec = dm.records["validation"][0]
    assert rec["input"] == "name : Aromi | food : Italian" and rec["output"] == "Aromi serves Italian food ."
    assert rec["references"] == ["Aromi serves Italian food .", "Aromi is Italian ."]
    assert len(dm.prompts("validation")) == 2


def test_dolly_native_and_prompt_answer_forms(tiny_model_dir, tmp_path):
    native = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare.", "category": "open_qa"},
        {"instruction": "Summarise.", "context": "Cats sleep a lot.", "response": "Cats sleep.", "category": "summarization"},
    ] * 2)
    dm = NLGDataModule(tiny_model_dir, task="dolly", path=native, val_size=1)
    dm.setup("fit")
    assert dm.template.name == "alpaca"
    assert set(dm.records["train"]["input"]) == {"", "Cats sleep a lot."}
    check_tokens(dm)
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n### Instruction:\nWho wrote Hamlet?\n\n### Response:")
    exported = write_jsonl(tmp_path / "dolly_prompts.jsonl", [{"prompt": prompt, "answer": "Shakespeare.###eos_token###"}] * 3)
    dm = NLGDataModule(tiny_model_dir, task="dolly", path=exported, val_size=1)
    dm.setup("fit")
    assert dm.template.name == "plain"
    assert dm.records["train"][0]["output"] == "Shakespeare."
    assert check_tokens(dm) == "<s>" + prompt


def test_oasst1_is_trained_on_the_whole_conversation_as_qlora_does(tiny_model_dir, tmp_path):
    text = "### Human: Hi, who are you?### Assistant: A helpful assistant."
    path = write_jsonl(tmp_path / "guanaco.jsonl", [{"text": text}] * 3)
    dm = NLGDataModule(tiny_model_dir, task="oasst1", path=path, val_size=1)
    dm.setup("fit")
    row = dm.tokenized["train"][0]
    assert check_tokens(dm) == "<s>"  # the prompt is BOS alone
    assert row["labels"][0] == IGNORE_INDEX and row["labels"][1:] == row["input_ids"][1:]


def test_xsum_style_document_summary(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "xsum.jsonl", [{"document": "A long\r\nstory.", "summary": "Short.", "id": "1"}] * 3)
    dm = NLGDataModule(tiny_model_dir, task="xsum", path=path, val_size=1)
    dm.setup("fit")
    assert dm.records["train"][0]["input"] == "A long\nstory." and dm.template.name == "summarization"


def test_field_mapping_names_any_columns(tiny_model_dir, tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer,gold\nWhat is 2+2?,4,4\nCapital of France?,Paris,Paris\nSay hi,hi,hi\n")
    dm = NLGDataModule(tiny_model_dir, task="file", path=str(path), prompt_field="question",
                       response_field="answer", val_size=1)
    dm.setup("fit")
    assert dm.template.name == "plain"  # no instruction: the question is the whole prompt
    assert check_tokens(dm) == "<s>" + dm.records["train"][0]["input"]
    with pytest.raises(DataError, match=r"data.response_field: .*qa.csv has no column 'reply'"):
        NLGDataModule(tiny_model_dir, task="file", path=str(path), prompt_field="question",
                      response_field="reply").setup("fit")


def test_hub_task_reads_what_datasets_load_dataset_reads(tiny_model_dir, tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"q": f"say {i}", "a": str(i)} for i in range(6)])
    write_jsonl(folder / "test.jsonl", [{"q": "say 9", "a": "9"}])
    dm = NLGDataModule(tiny_model_dir, task="hub", hub_id=str(folder), prompt_field="q", response_field="a",
                       val_size=2)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.records["train"]) == 4 and dm.records["test"]["output"] == ["9"]
    assert dm.source.origins["test"].endswith("[test]")
    with pytest.raises(DataError, match="data.hub_id"):
        NLGDataModule(tiny_model_dir, task="hub")


def test_hub_is_only_asked_when_no_file_is_given(tiny_model_dir, tmp_path):
    dm = NLGDataModule(tiny_model_dir, task="samsum", hub_id=str(tmp_path / "no_such_dataset"))
    with pytest.raises(DataError, match=r"data.hub_id: datasets.load_dataset\(.*no_such_dataset"):
        dm.setup("fit")


@pytest.mark.skipif(not (SHARED_DATA / "summarization" / "samsum" / "val.csv").exists(), reason="no shared data")
def test_shared_samsum_val_csv_parses_to_818_records(tiny_model_dir):
    path = str(SHARED_DATA / "summarization" / "samsum" / "val.csv")
    dm = NLGDataModule(tiny_model_dir, task="samsum", val_path=path)
    dm.setup("validate")
    recs = dm.records["validation"]
    assert len(recs) == 818 and all("\r" not in d for d in recs["input"])
    assert all(recs["output"])


@pytest.mark.skipif(not (SHARED_DATA / "data2text" / "e2e" / "devset.csv").exists(), reason="no shared data")
def test_shared_e2e_dev_groups_to_547_meaning_representations(tiny_model_dir):
    e2e = SHARED_DATA / "data2text" / "e2e"
    dm = NLGDataModule(tiny_model_dir, task="e2e", test_path=str(e2e / "devset.csv"))
    dm.setup("test")
    prompts = dm.prompts("test")
    assert len(dm.records["test"]) == 4672 and len(prompts) == 547
    assert sum(len(r) for r in prompts["references"]) == 4672
    lora = NLGDataModule(tiny_model_dir, task="e2e-lora", test_path=str(e2e / "lora_format" / "valid.txt"))
    lora.setup("test")
    assert len(lora.prompts("test")) == 547


def test_template_override_and_chat_template_with_a_single_bos(tiny_model_dir, alpaca_file):
    from lightning_qpeft.base_models.tokenizer import load_tokenizer

    dm = NLGDataModule(tiny_model_dir, task="alpaca", path=alpaca_file, val_size=2, template="chat")
    dm.tokenizer = load_tokenizer(tiny_model_dir)
    dm.tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: "
                                  "{{ m['content'] }}\n{% else %}Assistant: {{ m['content'] + eos_token }}{% endif %}"
                                  "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")
    dm.setup("fit")
    record, row = dm.records["train"][0], dm.tokenized["train"][0]
    user = "\n\n".join(x for x in (record["instruction"], record["input"]) if x)
    expected = f"<s>User: {user}\nAssistant: {record['output']}</s>"
    assert dm.tokenizer.decode(row["input_ids"]) == expected  # the template's BOS, not a second one
    prompt_len = len(dm.tokenizer(f"<s>User: {user}\nAssistant: ", add_special_tokens=False)["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len and IGNORE_INDEX not in row["labels"][prompt_len:]


def test_hub_datasets_with_a_loading_script_fall_back_to_the_parquet_export(tiny_model_dir, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, kwargs))
        if "revision" not in kwargs:
            raise RuntimeError("Dataset scripts are no longer supported, but found samsum.py")
        rows = {"id": ["1", "2", "3"], "dialogue": ["A: hi\r\nB: yo", "A: x", "B: y"], "summary": ["s1", "s2", "s3"]}
        return datasets.DatasetDict(train=datasets.Dataset.from_dict(rows),
                                    test=datasets.Dataset.from_dict(rows))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = NLGDataModule(tiny_model_dir, task="samsum", val_size=1)
    dm.setup("fit")
    assert [c[0] for c in calls] == ["Samsung/samsum", "Samsung/samsum"]
    assert calls[1][1] == {"revision": "refs/convert/parquet"}
    assert len(dm.records["train"]) == 2 and dm.source.origins["train"] == "Samsung/samsum[train]"
    dm.setup("test")
    assert dm.records["test"]["input"][0] == "A: hi\nB: yo"
