"""Refusals of what the user configured are `ConfigError`s (the study counts them as refused cells, not failed
ones), with the key they name and their texts unchanged from when they were plain ValueErrors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from lightning_qpeft.callbacks import GenerationMetrics, MMLUEvaluation, NonFiniteGuard
from lightning_qpeft.chat import ChatModel, chat
from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.data.chat_tokens import ChatOptions
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.data.resume import check_resume
from lightning_qpeft.merge import merge
from lightning_qpeft.model import compat
from lightning_qpeft.tasks.templates import TEMPLATES, get_template


def _full_model_folder(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


# (id, call(tmp_path), key, message(tmp_path)): each message is the text the refusal had as a ValueError
CASES = [
    ("datamodule", lambda tmp: NLGDataModule(source_max_len=0),
     "data.source_max_len", lambda tmp: "data.source_max_len: 0; use at least 1"),
    ("chat_options", lambda tmp: ChatOptions(train_on="first"),
     "data.train_on", lambda tmp: "data.train_on: 'first'; use all (every assistant turn) or last (the final one); "
                                  "data.train_on_source: true trains on every token"),
    ("template", lambda tmp: get_template("nope"),
     "data.template", lambda tmp: "data.template: unknown template 'nope'; choose one of "
                                  + ", ".join([*TEMPLATES, "chat"])),
    ("generation_metrics", lambda tmp: GenerationMetrics(fit_every_n_val=-1),
     "generation_metrics.fit_every_n_val", lambda tmp: "generation_metrics.fit_every_n_val: -1; use 0 (never) or more"),
    ("mmlu", lambda tmp: MMLUEvaluation(split="train"),
     "mmlu.split", lambda tmp: "mmlu.split: 'train'; choose val or test"),
    ("nonfinite", lambda tmp: NonFiniteGuard(policy="ignore"),
     "nonfinite.policy", lambda tmp: "nonfinite.policy: 'ignore'; choose skip or stop"),
    ("chat", lambda tmp: chat(ChatModel(), max_new_tokens=0),
     "chat --max_new_tokens", lambda tmp: "chat --max_new_tokens: 0; give at least 1"),
    ("merge", lambda tmp: merge(_full_model_folder(tmp), str(tmp / "out")),
     "merge --adapter_path", lambda tmp: f"merge --adapter_path: {str(tmp)!r} is a complete model folder (full "
                                         f"fine-tuning): {compat.METHODS['full'].merge}"),
    ("resume", lambda tmp: check_resume({"data_record": {"data.seed": 1}}, {"data_record": {"data.seed": 2}}, False),
     "ckpt_path", lambda tmp: "ckpt_path: the checkpoint was trained on other data or batches than this run's:\n"
                              "  data.seed: checkpoint 1 vs this run 2\nits saved place in the data would skip or "
                              "repeat records; resume with the checkpoint's data and batching, or set "
                              "data.resume_changed_data=true to go on from its weights and step on this data"),
]


@pytest.mark.parametrize("call, key, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refusals_are_config_errors(tmp_path, call, key, message):
    with pytest.raises(ValueError) as info:  # still a ValueError to code that catches bad values
        call(tmp_path)
    e = info.value
    assert isinstance(e, ConfigError)
    assert e.key == key
    assert str(e) == message(tmp_path)
    assert str(pickle.loads(pickle.dumps(e))) == str(e)  # crosses process boundaries with its text
