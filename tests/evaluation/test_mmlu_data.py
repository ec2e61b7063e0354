"""MMLU layouts: QLoRA's JSON files (lines or an array), the CSV folders, the hub's cais/mmlu rows and the
synthetic set all give the same scored items for the same questions; bad files are refused naming file:line."""

import json

import datasets
import pytest

from lightning_qpeft.data.sources import DataError
from lightning_qpeft.evaluation.mmlu_data import infer_k, read_qlora_json
from lightning_qpeft.evaluation.mmlu_sources import load_items, select
from lightning_qpeft.tasks import synthetic_mc


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from lightning_qpeft.base_models.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def csv_folder(tmp_path_factory):
    return synthetic_mc.write_mmlu_csv(tmp_path_factory.mktemp("mmlu") / "sample")


def test_csv_folder_gives_the_synthetic_items(tokenizer, csv_folder):
    for split, n, shots in (("val", 20, 5), ("test", 40, 0)):
        from_csv = load_items("csv", tokenizer, str(csv_folder), split, shots=shots)
        direct = load_items("synthetic", tokenizer, None, split, shots=shots, synthetic_questions=n)
        assert from_csv == direct and len(direct) == n * len(synthetic_mc.SUBJECTS)
        assert [it.subject for it in direct] == sorted(it.subject for it in direct)
        assert {it.k for it in direct} == {shots}


def test_qlora_json_lines_and_array_read_the_same(tmp_path, tokenizer):
    items = load_items("synthetic", tokenizer, None, "val", shots=3, synthetic_questions=4)
    records = [{"subject": it.subject, "input": it.prompt, "output": it.answer} for it in items]
    lines = tmp_path / "five_shot.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    array = tmp_path / "array.json"
    array.write_text(json.dumps(records, indent=1))
    assert read_qlora_json(lines) == read_qlora_json(array) == items  # k read back from the prompts


def test_k_is_read_back_from_a_built_prompt():
    assert infer_k("Header\n\nQ\nA. a\nB. b\nC. c\nD. d\nAnswer:") == 0
    assert infer_k("H\n\nQ1\nA. a\nAnswer: B\n\nQ2\nA. a\nAnswer: C\n\nQ\nA. a\nAnswer:") == 2


def test_hub_rows_map_onto_the_csv_items(tokenizer, csv_folder, monkeypatch):
    def fake_load_dataset(name, config, split):  # cais/mmlu's columns: question, subject, choices, answer (int)
        assert (name, config) == ("cais/mmlu", "all")
        ours = {"validation": "val", "dev": "dev", "test": "test"}[split]
        n = {"val": 20, "dev": 5, "test": 40}[ours]
        rows = [{"question": q.question, "subject": q.subject, "choices": list(q.choices), "answer": "ABCD".index(q.answer)}
                for q in synthetic_mc.questions(ours, n)]
        # subjects out of order (the loader sorts them), each subject's rows in file order (which it keeps)
        return datasets.Dataset.from_list(sorted(rows, key=lambda r: r["subject"], reverse=True))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load_items("hub", tokenizer, None, "val", shots=5)
    assert hub == load_items("csv", tokenizer, str(csv_folder), "val", shots=5)


@pytest.mark.parametrize("content, message", [
    ('{"subject": "x", "input": "q", "output": "A"}\n{"subject": "x", "input": \n', r"d.json:2: "),
    ('{"subject": "x", "input": "q", "output": "A"}\n{"subject": "x", "output": "B"}\n', r"line 2 needs string fields"),
    ('{"subject": "x", "input": "q", "output": "E"}\n', r"line 1 has output 'E'"),
])
def test_bad_qlora_file_is_refused_with_its_line(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_qlora_json(path)


def test_bad_csv_row_is_refused_with_file_and_line(tmp_path, tokenizer):
    for split in ("dev", "val"):
        (tmp_path / split).mkdir()
    (tmp_path / "dev" / "s_dev.csv").write_text("q,a,b,c,d,A\n")
    (tmp_path / "val" / "s_val.csv").write_text("q,a,b,c,d,A\n\"multi\nline\",a,b,c,d\n")
    with pytest.raises(DataError, match=r"s_val.csv:3: expected question,A,B,C,D,answer"):
        load_items("csv", tokenizer, str(tmp_path), "val", shots=1)


def test_missing_path_and_folder_are_refused(tmp_path, tokenizer):
    with pytest.raises(DataError, match="mmlu.path: no such file"):
        load_items("json", tokenizer, str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="has no test/ folder"):
        load_items("csv", tokenizer, str(tmp_path), "test")
    with pytest.raises(ValueError, match="mmlu.source csv needs a path"):
        load_items("csv", tokenizer, None)


def test_select_first_or_seeded(tokenizer):
    items = load_items("synthetic", tokenizer, None, "test", shots=0, synthetic_questions=10)
    assert select(items, 7) == items[:7]  # QLoRA's max_mmlu_samples: the first N
    drawn = select(items, 7, seed=1)
    assert drawn == select(items, 7, seed=1) != items[:7]
    assert len({it.subject for it in drawn}) > 1 and all(it in items for it in drawn)
    assert select(items, None) == items == select(items, 1000)
