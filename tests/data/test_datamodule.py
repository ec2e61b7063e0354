import json

import pytest

from lightning_qpeft.data.collate import IGNORE_INDEX
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.data.sources import DataError
from lightning_qpeft.tasks.templates import ALPACA
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


def test_pad_to_multiple_of_is_checked_and_counted_in_the_padding(tiny_model_dir):
    with pytest.raises(ValueError, match="data.pad_to_multiple_of: 0; give at least 1"):
        NLGDataModule(tiny_model_dir, pad_to_multiple_of=0)
    fractions = []
    for multiple in (None, 64):
        dm = NLGDataModule(tiny_model_dir, batch_size=4, max_train_records=40, pad_to_multiple_of=multiple)
        dm.setup("fit")
        stats = dm.statistics()
        batch = next(iter(dm.train_dataloader()))
        assert multiple is None or batch["input_ids"].shape[1] % multiple == 0
        fractions.append(stats["data/padding_fraction"])
    assert fractions[1] > fractions[0]  # the rounding's extra positions are padding, and reported as such


def test_unknown_task_and_template_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="data.task: unknown task 'alpacca'"):
        NLGDataModule(tiny_model_dir, task="alpacca")
    with pytest.raises(ValueError, match="data.template: unknown template 'alpacca'"):
        NLGDataModule(tiny_model_dir, template="alpacca")


# ---------------------------------------------------------------------------------------------- malformed input
@pytest.mark.parametrize("name, content, match", [
    ("empty.jsonl", "", r"data.path: .*empty.jsonl is empty"),
    ("header.csv", "instruction,output\n", r"header.csv holds no records"),
    ("bad.csv", 'instruction,output\n"a","b"\n"c","d","e"\n', r"bad.csv: row 2 \(line 3\) has 3 fields, the header 2"),
    ("data.xml", "<a/>", r"unknown file type"),
    ("broken.json", '[{"instruction": "a", "output": "b"},\n {"instruction": ]', r"broken.json:2:"),
])
def test_malformed_files_are_refused_naming_file_and_line(tiny_model_dir, tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        NLGDataModule(tiny_model_dir, task="file", path=str(path)).setup("fit")


def test_record_with_no_target_token_is_dropped_with_file_and_row(tiny_model_dir, tmp_path):
    from lightning_qpeft.base_models.tokenizer import load_tokenizer

    rows = [{"input": f"q{i}", "output": "" if i == 3 else f"a{i}"} for i in range(1, 9)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    val = write_jsonl(tmp_path / "v.jsonl", rows[:2])
    dm = NLGDataModule(tiny_model_dir, task="file", path=path, val_path=val)
    dm.tokenizer = load_tokenizer(tiny_model_dir)
    dm.tokenizer.eos_token = None  # a tokenizer without EOS: an empty output is no target token at all
    with pytest.warns(UserWarning, match=r"dropped 1 record\(s\) with no target token .*d.jsonl rows \[3\]"):
        dm.setup("fit")
    assert all(n > 0 for n in dm.tokenized["train"]["n_supervised"]) and dm.dropped["train"] == 1
    assert len(dm.tokenized["train"]) == 7 and dm.dropped["validation"] == 0


def test_long_records_are_cut_and_counted(tiny_model_dir, tmp_path):
    rows = [{"instruction": "Repeat. " * (40 if i < 3 else 1), "output": "ok " * (30 if i == 5 else 1)}
            for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = NLGDataModule(tiny_model_dir, task="file", path=path, val_size=1, source_max_len=48, target_max_len=8, seed=0)
    dm.setup("fit")
    stats = dm.statistics()
    truncated = sum(r in (1, 2, 3, 6) for r in dm.tokenized["train"]["row"])
    assert stats["data/records_truncated"] == truncated > 0
    assert max(dm.tokenized["train"]["length"]) <= 56


# ---------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("kw", [{}, {"group_by_length": True}, {"packing": True}])
def test_statistics_match_the_batches_the_train_loader_yields(tiny_model_dir, tmp_path, kw):
    rows = [{"instruction": "Say it. " * (1 + i % 7), "output": "yes " * (1 + i % 5)} for i in range(60)]
    dm = NLGDataModule(tiny_model_dir, task="file", path=write_jsonl(tmp_path / "d.jsonl", rows), val_size=4,
                       batch_size=8, **kw)
    dm.setup("fit")
    stats = dm.statistics(dm.train_sampler())
    tok = dm.tokenized["train"]
    assert stats["data/records"] == 56 and stats["data/tokens"] == sum(len(x) for x in tok["input_ids"])
    assert stats["data/supervised_tokens"] == sum(sum(1 for y in x[1:] if y != IGNORE_INDEX) for x in tok["labels"])
    batches = list(dm.train_dataloader())  # the first epoch, as training sees it
    real = sum(int((b["labels"] != -7).sum()) if "attention_mask" not in b else int(b["attention_mask"].sum())
               for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    assert real == stats["data/tokens"] and len(batches) == stats["data/batches_per_epoch"]
    assert stats["data/padding_fraction"] == pytest.approx(1 - real / slots)
    if kw.get("packing"):
        assert all(b["input_ids"].shape[0] == 1 and "position_ids" in b for b in batches)


def test_statistics_are_logged_once_per_fit(tiny_model_dir, alpaca_file, tmp_path, caplog):
    import logging

    from lightning.pytorch.loggers import CSVLogger

    from lightning_qpeft.model.module import QPeftModule
    from tests.conftest import cpu_trainer

    module = QPeftModule(tiny_model_dir, quantization="none", compute_dtype="float32", dtype="float32",
                         adapter=__import__("peft").LoraConfig(r=4, target_modules="all-linear"))
    dm = NLGDataModule(tiny_model_dir, task="file", path=alpaca_file, val_size=2, batch_size=4, packing=True)
    logger = CSVLogger(tmp_path)
    with caplog.at_level(logging.INFO):
        cpu_trainer(max_steps=2, limit_val_batches=0, logger=logger).fit(module, dm)
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    logged = [dict(zip(header, line.split(","))) for line in lines[1:]]
    records = [r["data/records"] for r in logged if r.get("data/records")]
    assert records == ["14"]
    assert "data: records 14" in caplog.text


# ---------------------------------------------------------------------------------------------- memory
def test_a_large_file_is_never_materialised_as_python_rows(tiny_model_dir, tmp_path, monkeypatch):
    """Every row access of `datasets` goes through query_table / table_iter: watch them. Text columns must
    only ever be read a batch at a time; the whole file never becomes one Python list."""
    import datasets.arrow_dataset as arrow_dataset
    import pyarrow as pa

    widest = {"rows": 0}

    def watch(table):
        texty = any(not (pa.types.is_integer(t) or pa.types.is_boolean(t)) for t in table.schema.types)
        if texty:
            widest["rows"] = max(widest["rows"], table.num_rows)
        return table

    real_query, real_iter = arrow_dataset.query_table, arrow_dataset.table_iter
    monkeypatch.setattr(arrow_dataset, "query_table", lambda *a, **k: watch(real_query(*a, **k)))
    monkeypatch.setattr(arrow_dataset, "table_iter", lambda *a, **k: (watch(t) for t in real_iter(*a, **k)))
    n = 12_000
    path = write_jsonl(tmp_path / "big.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(n)])
    dm = NLGDataModule(tiny_model_dir, task="file", path=path, val_size=100, group_by_length=True, batch_size=16)
    dm.setup("fit")
    dm.statistics(dm.train_sampler())
    next(iter(dm.train_dataloader()))
    assert len(dm.tokenized["train"]) == n - 100
    assert 0 < widest["rows"] <= 4096, widest  # batches of <= 4096 rows, never all 12,000
    assert dm.tokenized["train"].cache_files  # memory-mapped Arrow files, not an in-memory table
