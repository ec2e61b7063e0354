"""Conversation layouts become checked `messages` records; bad conversations are refused naming file and line."""

import csv
import json

import pytest

from lightning_qpeft.data.conversations import speakers
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.data.sources import DataError
from tests.conftest import SHARED_DATA, write_jsonl

EXPECTED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "Red."}]


def records(tiny_model_dir, path, split="train", **kw):
    dm = NLGDataModule(tiny_model_dir, task=kw.pop("task", "file"), path=path, val_size=1, chat_template="chatml",
                       **kw)
    dm.setup("fit")
    return dm.records[split]


def test_messages_and_sharegpt_give_the_same_conversation(tiny_model_dir, tmp_path):
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": EXPECTED}] * 3)
    share = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
             for m in EXPECTED]
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": share[1:], "system": "Be brief."}] * 3)
    for path in (messages, sharegpt):
        ds = records(tiny_model_dir, path)
        assert ds[0]["messages"] == EXPECTED
        assert ds[0]["output"] == "Red." and ds[0]["references"] == ["Red."]


def test_turns_in_a_csv_column_are_json_text(tiny_model_dir, tmp_path):
    path = tmp_path / "chat.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerows([[json.dumps(EXPECTED)]] * 2 + [["[{'role': 'user'}]"]])
    with pytest.raises(DataError, match=r"chat.csv: row 3: the turns are text but not JSON"):
        records(tiny_model_dir, str(path))
    path.write_text(path.read_text().rsplit("\n", 2)[0] + "\n")
    assert records(tiny_model_dir, str(path))[0]["messages"] == EXPECTED


def _tree():
    """Prompt -> two answers (rank 1, rank 0) -> the rank-0 answer has a follow-up, answered twice."""
    return [
        dict(message_id="p", parent_id=None, role="prompter", text="Q1", rank=None, message_tree_id="t"),
        dict(message_id="a1", parent_id="p", role="assistant", text="worse answer", rank=1, message_tree_id="t"),
        dict(message_id="a0", parent_id="p", role="assistant", text="best answer", rank=0, message_tree_id="t"),
        dict(message_id="q2", parent_id="a0", role="prompter", text="Q2", rank=0, message_tree_id="t"),
        dict(message_id="b1", parent_id="q2", role="assistant", text="second", rank=1, message_tree_id="t"),
        dict(message_id="b0", parent_id="q2", role="assistant", text="first", rank=0, message_tree_id="t"),
        # a tree nobody answered, and one whose top path ends with an unanswered prompt
        dict(message_id="x", parent_id=None, role="prompter", text="lonely", rank=None, message_tree_id="u"),
        dict(message_id="y", parent_id=None, role="prompter", text="Q", rank=None, message_tree_id="v"),
        dict(message_id="y1", parent_id="y", role="assistant", text="A", rank=0, message_tree_id="v"),
        dict(message_id="y2", parent_id="y1", role="prompter", text="unanswered", rank=0, message_tree_id="v"),
    ]


TOP_PATH = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "best answer"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "first"}]
SHORT_PATH = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def _nested(rows, parent=None):
    return [{"message_id": r["message_id"], "role": r["role"], "text": r["text"], "rank": r["rank"],
             "replies": _nested(rows, r["message_id"])} for r in rows if r["parent_id"] == parent]


def test_oasst_trees_become_their_top_ranked_paths(tiny_model_dir, tmp_path):
    table = write_jsonl(tmp_path / "oasst.jsonl", _tree())
    trees = write_jsonl(tmp_path / "trees.jsonl", [{"message_tree_id": t["message_id"], "prompt": t}
                                                   for t in _nested(_tree())])
    for path in (table, trees):
        dm = NLGDataModule(tiny_model_dir, task="oasst1", path=path, val_path=path, chat_template="chatml")
        dm.setup("fit")
        assert dm.records["train"]["messages"] == [TOP_PATH, SHORT_PATH]
        assert dm.records["train"]["row"] == ([1, 8] if path == table else [1, 3])


def test_samsum_chat_is_a_summary_then_who_took_part(tiny_model_dir, tmp_path):
    path = tmp_path / "s.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "summary", "dialogue"])
        w.writerow(["1", "Amanda baked cookies for Jerry. ", "Amanda: I baked cookies.\r\nJerry: Sure!\r\nAmanda: :-)"])
        w.writerow(["2", "Tim says hi.", "Tim: hi\r\nKim: hey\r\nLou: yo"])
    ds = records(tiny_model_dir, str(path), task="samsum-chat")
    assert ds[0]["messages"] == [
        {"role": "user", "content": "Summarize this chat.\n\nAmanda: I baked cookies.\nJerry: Sure!\nAmanda: :-)"},
        {"role": "assistant", "content": "Amanda baked cookies for Jerry."},
        {"role": "user", "content": "Who took part in it?"},
        {"role": "assistant", "content": "Amanda and Jerry."}]
    assert speakers("Tim: hi\nKim: hey\nLou: yo") == ["Tim", "Kim", "Lou"]


@pytest.mark.skipif(not (SHARED_DATA / "summarization" / "samsum" / "val.csv").exists(), reason="no shared SAMSum")
def test_shared_samsum_val_becomes_818_two_exchange_conversations(tiny_model_dir):
    dm = NLGDataModule(tiny_model_dir, task="samsum-chat", path=str(SHARED_DATA / "summarization" / "samsum" / "val.csv"),
                       val_size=1, chat_template="chatml")
    dm.setup("fit")
    turns = [len(m) for split in ("train", "validation") for m in dm.records[split]["messages"]]
    assert len(turns) == 818 and set(turns) == {4}


BAD = [
    ("no assistant turn", [{"role": "user", "content": "hi"}], r"line 2: no assistant turn"),
    ("unknown role", [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
     r"line 2: turn 2 has role 'tool', which is not a known role"),
    ("user after user", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                         {"role": "assistant", "content": "c"}],
     r"line 2: turn 2 \(user\) follows a user turn: user and assistant turns must alternate"),
    ("assistant first", [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
     r"line 2: turn 1 \(assistant\) opens the conversation"),
    ("system late", [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
     r"line 2: turn 2 \(system\) follows a user turn; a system prompt comes first, once"),
    ("empty content", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}],
     r"line 2: turn 2 \(assistant\) has no content"),
    ("missing content", [{"role": "user", "content": "a"}, {"role": "assistant"}],
     r"line 2: turn 2 \(assistant\) has no content \(got None\)"),
    ("ends with user", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}], r"line 2: ends with a user turn that no assistant turn answers"),
    ("no turns", [], r"line 2: no turns"),
]


@pytest.mark.parametrize("messages, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_conversations_are_refused_naming_file_and_line(tiny_model_dir, tmp_path, messages, match):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, {"messages": messages}, good])
    dm = NLGDataModule(tiny_model_dir, task="file", path=path, val_size=1, chat_template="chatml")
    with pytest.raises(DataError, match=f"{tmp_path / 'bad.jsonl'}: {match}"):
        dm.setup("fit")


def test_two_system_prompts_are_refused(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [{"messages": EXPECTED, "system": "Other."}] * 2)
    with pytest.raises(DataError, match=r"two.jsonl: line 1: two system prompts"):
        records(tiny_model_dir, path)


def test_predict_records_may_end_with_the_question(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": EXPECTED[:2]}, {"messages": EXPECTED}])
    dm = NLGDataModule(tiny_model_dir, task="file", predict_path=path, chat_template="chatml")
    dm.setup("predict")
    prompts = dm.prompts("predict")
    assert prompts[0]["prompt"].endswith("<|im_start|>user\nHi</s>\n<|im_start|>assistant\n")
    assert prompts[0]["references"] == [] and prompts[1]["references"] == ["Red."]
    assert prompts[1]["prompt"].endswith("<|im_start|>user\nColour?</s>\n<|im_start|>assistant\n")
    assert json.dumps(prompts[1]["messages"]) == json.dumps(EXPECTED)  # kept for the prediction writer


def test_predict_renders_conversations_with_the_template_and_answers(smollm2_dir, tmp_path):
    from lightning_qpeft.cli import main

    path = write_jsonl(tmp_path / "ask.jsonl", [
        {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        {"messages": [{"role": "system", "content": "Answer in one word."},
                      {"role": "user", "content": "What is the capital of Italy?"},
                      {"role": "assistant", "content": "Rome"}]}])
    out = tmp_path / "predictions.jsonl"
    main(["predict", "--config", "configs/tiny.yaml", "--model.base_model", smollm2_dir, "--model.quantization", "none",
          "--model.generation.max_new_tokens", "24", "--data.predict_path", path, "--data.template", "chat",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
          "--prediction_writer.path", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["prompt"].endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                      "<|im_start|>assistant\n")
    assert "Paris" in rows[0]["prediction"] and "<|im_end|>" not in rows[0]["prediction"]
    assert rows[1]["prompt"].startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    assert rows[1]["prompt"].endswith("Italy?<|im_end|>\n<|im_start|>assistant\n") and rows[1]["references"] == ["Rome"]
    assert "Rome" in rows[1]["prediction"] and "\nuser" not in rows[1]["prediction"]  # stopped at its turn's end
