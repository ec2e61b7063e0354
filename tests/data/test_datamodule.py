import json

import pytest

from lightning_qpeft.data.collate import IGNORE_INDEX
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.data.sources import DataError
from lightning_qpeft.data.templates import ALPACA
from tests.conftest import write_jsonl


def test_tokenization_reproduces_the_alpaca_template_and_masks_the_prompt(tiny_model_dir, alpaca_file):
    dm = NLGDataModule(tiny_model_dir, task="file", path=alpaca_file, val_size=2)
    dm.setup("fit")
    tok = dm.tokenizer
    record = dm.records["train"][0]
    row = dm.tokenized["train"][0]
    prompt = ALPACA.render(record)
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response: ")
    expected_source = tok(tok.bos_token + prompt, add_special_tokens=False)["input_ids"]
    expected_target = tok(record["output"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == expected_source + expected_target
    assert row["labels"] == [IGNORE_INDEX] * len(expected_source) + expected_target
    assert tok.decode(row["input_ids"]) == tok.bos_token + prompt + record["output"] + tok.eos_token


def test_train_on_source_keeps_prompt_labels(tiny_model_dir, alpaca_file):
    dm = NLGDataModule(tiny_model_dir, task="file", path=alpaca_file, val_size=2, train_on_source=True)
    dm.setup("fit")
    row = dm.tokenized["train"][0]
    assert row["labels"] == row["input_ids"]


def test_source_and_target_lengths_are_capped(tiny_model_dir, alpaca_file):
    dm = NLGDataModule(tiny_model_dir, task="file", path=alpaca_file, val_size=2, source_max_len=5, target_max_len=2)
    dm.setup("fit")
    for row in dm.tokenized["train"]:
        assert len(row["input_ids"]) == 7 and row["labels"][:5] == [IGNORE_INDEX] * 5


def test_padded_batch_masks_padding(tiny_model_dir, alpaca_file):
    dm = NLGDataModule(tiny_model_dir, task="file", path=alpaca_file, val_size=2, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == batch["input_ids"].shape[1] and lengths.min() < lengths.max()
    for i, n in enumerate(lengths):
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_split_is_seeded(tiny_model_dir, alpaca_file, tmp_path):
    path = tmp_path / "many.json"
    path.write_text(json.dumps([{"instruction": f"say {i}", "output": str(i)} for i in range(50)]))
    a = NLGDataModule(tiny_model_dir, task="file", path=str(path), val_size=10, seed=1)
    b = NLGDataModule(tiny_model_dir, task="file", path=str(path), val_size=10, seed=1)
    c = NLGDataModule(tiny_model_dir, task="file", path=str(path), val_size=10, seed=2)
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.records["validation"]["output"] == b.records["validation"]["output"]
    assert a.records["validation"]["output"] != c.records["validation"]["output"]
    assert len(a.records["validation"]) == 10 and len(a.records["train"]) == 40


def test_builtin_task_is_deterministic(tiny_model_dir):
    a, b = NLGDataModule(tiny_model_dir), NLGDataModule(tiny_model_dir)
    a.setup("fit"); b.setup("fit")
    assert a.records["train"][:5] == b.records["train"][:5]
    assert "test" not in a.records  # fit reads train and validation only
    a.setup("test")
    assert len(a.records["test"]) == 200


def test_missing_data_file_is_refused(tiny_model_dir, tmp_path):
    dm = NLGDataModule(tiny_model_dir, task="file", path=str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match=r"data.path: no such file: .*nope.json"):
        dm.setup("fit")


def test_record_without_output_is_refused_with_its_line(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"},
                                              {"instruction": "d", "output": "e"}])
    dm = NLGDataModule(tiny_model_dir, task="file", path=path)
    with pytest.raises(DataError, match=r"d.jsonl: line 2 has no 'output' string"):
        dm.setup("fit")


def test_file_without_output_field_is_refused(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}] * 3)
    with pytest.raises(DataError, match=r"no 'output' field"):
        NLGDataModule(tiny_model_dir, task="file", path=path).setup("fit")


def test_bad_json_line_is_reported_with_file_and_line(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, '{"instruction": "c", "output": '])
    with pytest.raises(DataError, match=r"d.jsonl:2:"):
        NLGDataModule(tiny_model_dir, task="file", path=path).setup("fit")


def test_no_target_token_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="data.target_max_len: 0 leaves no target token"):
        NLGDataModule(tiny_model_dir, target_max_len=0)


def test_unknown_task_and_template_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="data.task: unknown task 'alpacca'"):
        NLGDataModule(tiny_model_dir, task="alpacca")
    with pytest.raises(ValueError, match="data.template: unknown template 'alpacca'"):
        NLGDataModule(tiny_model_dir, template="alpacca")
