"""`chat`: a real terminal session (driven through a pseudo-terminal) and `--prompt` give the answers the model
gives greedily to the rendered conversation; history, /reset and /exit work; an adapter trained on chat data is
spoken to with the template and system prompt it was trained with; SmolLM2 answers a real question. The fit
that made the adapter is also the earlier run that bad conversation data must leave untouched."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_qpeft.chat import ChatModel, ChatSession, load_model, main
from lightning_qpeft.cli import main as cli_main
from lightning_qpeft.data.chat_tokens import CHATML, use_chat_template
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Name colour {i}."}, {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Blue."}]


def fit_args(tiny: str, run: Path, data: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny,
            "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--generation_metrics.test", "false", "--data.task", "file", "--data.path", data, "--data.val_size", "0.25",
            "--data.template", "chat", "--data.chat_template", "chatml", "--data.system_prompt", "Be brief."]


@pytest.fixture(scope="module")
def chat_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A fit (2 steps) on conversations with the chatml default and a system prompt: its run folder."""
    root = tmp_path_factory.mktemp("chat-run")
    data = write_jsonl(root / "chat.jsonl", [{"messages": conversation(i)} for i in range(8)])
    cli_main(fit_args(tiny_model_dir, root / "run", data))
    return root / "run"


@pytest.fixture(scope="module")
def chat_adapter(chat_run) -> str:
    return str(next(chat_run.rglob("adapter_config.json")).parent)


def expected_session(adapter: str, max_new_tokens: int) -> ChatSession:
    model, tokenizer = load_model(ChatModel(adapter_path=adapter))
    use_chat_template(tokenizer, "chatml")
    return ChatSession(model, tokenizer, "Be brief.", max_new_tokens)


def test_the_adapter_records_how_its_conversations_were_rendered(chat_adapter):
    recorded = json.loads((Path(chat_adapter) / "qpeft_training.json").read_text())
    assert recorded["chat_template"] == CHATML and recorded["system_prompt"] == "Be brief."
    assert recorded["quantization"] == "nf4-dq"


def test_prompt_mode_prints_the_answer_alone(chat_adapter, capsys):
    want = expected_session(chat_adapter, 8).reply("Name a colour.")
    main(["--model.adapter_path", chat_adapter, "--prompt", "Name a colour.", "--max_new_tokens", "8"])
    assert capsys.readouterr().out == want + "\n"


def _read_until(master: int, marker: str, timeout: float = 120) -> str:
    buf, deadline = b"", time.monotonic() + timeout
    while marker.encode() not in buf:
        ready, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise TimeoutError(f"no {marker!r} in {buf.decode(errors='replace')!r}")
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        buf += chunk
    return ANSI.sub("", buf.decode("utf-8", errors="replace"))


def _answer(transcript: str) -> str:
    return " ".join(transcript.split("assistant> ", 1)[1].rsplit("user> ", 1)[0].split())


def test_interactive_chat_in_a_terminal_keeps_history_resets_and_exits(chat_adapter):
    expected = expected_session(chat_adapter, 8)
    first, second = expected.reply("Name a colour."), expected.reply("Another?")
    expected.reset()
    fresh = expected.reply("Another?")
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_qpeft", "chat", "--model.adapter_path", chat_adapter,
                             "--max_new_tokens", "8"], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    try:
        assert "(/reset forgets the conversation, /exit ends it)" in _read_until(master, "user> ")
        os.write(master, b"Name a colour.\n")
        assert _answer(_read_until(master, "user> ")) == " ".join(first.split())
        os.write(master, b"Another?\n")  # answered with the first exchange as history
        assert _answer(_read_until(master, "user> ")) == " ".join(second.split())
        os.write(master, b"/reset\n")
        assert "(conversation cleared)" in _read_until(master, "user> ")
        os.write(master, b"Another?\n")
        assert _answer(_read_until(master, "user> ")) == " ".join(fresh.split())
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    assert first and second  # answers were read back, not empty lines


def test_history_is_rendered_with_the_chat_template(chat_adapter):
    session = expected_session(chat_adapter, 4)
    session.reply("Name a colour.")
    text = session.tokenizer.decode(session.prompt_ids("Another?")[0])
    assert text.startswith("<s><|im_start|>system\nBe brief.</s>\n<|im_start|>user\nName a colour.</s>\n"
                           "<|im_start|>assistant\n")
    assert text.endswith("</s>\n<|im_start|>user\nAnother?</s>\n<|im_start|>assistant\n")


def test_a_tokenizer_without_a_chat_template_needs_one_given(tiny_model_dir):
    with pytest.raises(Exception, match=r"chat --chat_template.*no chat template.*set chat --chat_template to chatml"):
        main(["--model.base_model", tiny_model_dir, "--prompt", "hi", "--max_new_tokens", "2"])


def test_smollm2_answers_a_real_question(smollm2_dir, capsys):
    main(["--model.base_model", smollm2_dir, "--prompt", "What is the capital of France?", "--max_new_tokens", "24"])
    assert "Paris" in capsys.readouterr().out


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


GOOD = {"messages": conversation(0)}
BAD_FIT = [
    ("no assistant turn", [GOOD, {"messages": [{"role": "user", "content": "hi"}]}], r"bad.jsonl: line 2: no assistant"),
    ("unknown role", [GOOD, {"messages": [{"role": "bot", "content": "hi"}]}], r"bad.jsonl: line 2: turn 1 has role 'bot'"),
    ("roles out of order", [GOOD, GOOD, {"messages": conversation(1)[1:]}],
     r"bad.jsonl: line 3: turn 1 \(assistant\) opens the conversation"),
    ("empty content", [{"messages": conversation(1)[:3] + [{"role": "assistant", "content": ""}]}],
     r"bad.jsonl: line 1: turn 4 \(assistant\) has no content"),
]


@pytest.mark.parametrize("rows, match", [b[1:] for b in BAD_FIT], ids=[b[0] for b in BAD_FIT])
def test_bad_conversations_stop_fit_naming_the_line_and_keep_the_earlier_run(chat_run, tiny_model_dir, rows, match):
    before = _digest(chat_run)
    bad = write_jsonl(chat_run.parent / "bad.jsonl", rows * 4 if len(rows) == 1 else rows)
    with pytest.raises(Exception, match=match):
        cli_main(fit_args(tiny_model_dir, chat_run, bad))
    after = _digest(chat_run)
    assert {k: after.get(k) for k in before} == before  # nothing the earlier run wrote is changed or gone


def test_an_unsplittable_template_stops_fit_before_training(chat_run, tiny_model_dir):
    before = _digest(chat_run)
    data = write_jsonl(chat_run.parent / "good.jsonl", [GOOD] * 8)
    args = fit_args(tiny_model_dir, chat_run, data)
    args[args.index("chatml")] = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    with pytest.raises(Exception, match=r"data.chat_template: the chat template cannot be split into turns: "
                                        r"add_generation_prompt adds nothing"):
        cli_main(args)
    after = _digest(chat_run)
    assert {k: after.get(k) for k in before} == before  # nothing the earlier run wrote is changed or gone


def test_resuming_a_conversation_run_with_other_turns_trained_is_refused(chat_run, tiny_model_dir):
    args = fit_args(tiny_model_dir, chat_run, str(chat_run.parent / "chat.jsonl"))
    args += ["--ckpt_path", str(next(chat_run.rglob("last.ckpt"))), "--data.train_on", "last"]
    with pytest.raises(ValueError, match=r"data.train_on: checkpoint 'all' vs this run 'last'"):
        cli_main(args)
