"""What a checkpoint records about the data it was trained on, and the check when a run resumes from it.

Config key: `data.resume_changed_data` (default false).

`NLGDataModule.state_dict` returns `data_record`, which Lightning stores in every checkpoint: the training
data's source (task, file with its size and SHA-256, hub id), how records become tokens (template, lengths,
train_on_source, max_train_records, the validation split and its seed; for conversations train_on, the
system prompt and the chat template), how tokens become batches (batch_size,
max_tokens, packing, group_by_length, the number of processes) and what came out (training records and tokens).
The checkpoint's loader position (the batches of the epoch already yielded) only means something for these. On
resume, `NLGDataModule.load_state_dict` compares them with this run's:

- equal: the loader continues with the next batch, as an unbroken run would;
- different: refused, listing what differs, unless `data.resume_changed_data: true` says the change is meant.
  Then the weights, optimizer, scheduler and step carry on, and the loader ignores the saved position: it starts
  the epoch's plan of the new data from its first batch (`FreshStartLoader`). Lightning still counts the batches
  run before the checkpoint towards that epoch, so it ends that many batches early; later epochs are whole.

A file is identified by its content (a moved or renamed file with the same bytes is the same data).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_qpeft.core.errors import ConfigError

# record entries that are about the same thing: shown, compared through their neighbour
SHOWN_ONLY = {"data.path"}


def file_digest(path: str) -> dict[str, Any]:
    """Size and SHA-256 of a file, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return {"bytes": Path(path).expanduser().stat().st_size, "sha256": sha.hexdigest()}


def data_record(dm: Any) -> dict[str, Any]:
    """The training data and batching of a set-up `NLGDataModule`, as plain data (weights_only-loadable)."""
    train = dm.tokenized["train"]
    lengths = train.with_format("numpy")["length"] if len(train) else []
    world, _ = dm._world()
    source = dm.source
    record: dict[str, Any] = {"data.task": dm.task}
    if dm.path is not None:
        record["data.path"] = str(dm.path)
        record["data.path content"] = file_digest(dm.path)
    elif source.task.builtin is None and source.task.tokens is None:
        record.update({"data.hub_id": source.hub_id, "data.hub_config": source.hub_config,
                       "data.hub_kwargs": json.dumps(source.hub_kwargs, sort_keys=True, default=str)})
    record.update({
        "data.template": getattr(dm.template, "name", None),
        "data.source_max_len": dm.source_max_len,
        "data.target_max_len": dm.target_max_len,
        "data.train_on_source": dm.train_on_source,
        "data.max_train_records": dm.max_train_records,
        "data.val_size": dm.val_size if dm.validation_split_off_train else None,
        "data.seed": dm.seed,
        "data.batch_size": None if dm.max_tokens is not None else dm.batch_size,
        "data.max_tokens": dm.max_tokens,
        "data.packing": dm.packing,
        "data.group_by_length": dm.group_by_length,
        "processes (trainer.devices x trainer.num_nodes)": world,
        "training records": len(train),
        "training tokens": int(sum(int(n) for n in lengths)) if len(train) else 0,
    })
    if getattr(dm, "chat", False):  # conversations: the turns trained and the template they are rendered with
        template = (dm.tokenizer.chat_template or "").encode()
        record.update({"data.train_on": dm.conversation.train_on, "data.system_prompt": dm.conversation.system_prompt,
                       "data.chat_template (sha256)": hashlib.sha256(template).hexdigest()[:16]})
    return record


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: checkpoint X vs this run Y' for every entry that differs."""
    diffs = []
    for key in list(current) + [k for k in saved if k not in current]:
        if key in SHOWN_ONLY:
            continue
        old, new = saved.get(key), current.get(key)
        if key == "data.path content":
            if (old or {}).get("sha256") != (new or {}).get("sha256"):
                diffs.append(f"data.path: checkpoint {_file(saved)} vs this run {_file(current)}")
        elif old != new:
            diffs.append(f"{key}: checkpoint {old!r} vs this run {new!r}")
    return diffs


def _file(record: dict[str, Any]) -> str:
    if "data.path" not in record:
        return f"no file (task {record.get('data.task')!r})"
    content = record.get("data.path content") or {}
    return f"{record['data.path']!r} ({content.get('bytes')} bytes, sha256 {str(content.get('sha256'))[:12]})"


def refusal(diffs: list[str]) -> ConfigError:
    return ConfigError("ckpt_path", "the checkpoint was trained on other data or batches than this run's:\n  "
                       + "\n  ".join(diffs) + "\nits saved place in the data would skip or repeat records",
                       "resume with the checkpoint's data and batching, or set data.resume_changed_data=true to go "
                       "on from its weights and step on this data")


def changed_data_warning(diffs: list[str]) -> str:
    return ("ckpt_path: data.resume_changed_data=true: the checkpoint was trained on other data or batches ("
            + "; ".join(diffs) + "); its weights, optimizer and step carry on, and the loader starts this epoch's "
            "plan of this run's data from its first batch")


def check_resume(state: dict[str, Any], current: dict[str, Any], allow_changed: bool) -> bool:
    """Compare a checkpoint's data record with this run's (`NLGDataModule.state_dict` of each).

    Returns:
        True when they differ and `allow_changed` (data.resume_changed_data) lets the run go on: the loader then
        ignores the saved position.

    Raises:
        ValueError: they differ and `allow_changed` is off, listing the differences.
    """
    saved = state.get("data_record")
    if saved is None:
        rank_zero_warn("ckpt_path: the checkpoint records no training data (an older version saved it); resuming "
                       "without checking that the data and batching are the same")
        return False
    diffs = differences(saved, current["data_record"])
    if not diffs:
        return False
    if not allow_changed:
        raise refusal(diffs)
    rank_zero_warn(changed_data_warning(diffs))
    return True


class FreshStartLoader(StatefulDataLoader):
    """A `StatefulDataLoader` that, once, ignores the position a checkpoint restores (see the module docstring).

    Args:
        *args: `StatefulDataLoader` arguments.
        fresh_start: ignore the next `load_state_dict`.
        **kwargs: `StatefulDataLoader` arguments.
    """

    def __init__(self, *args: Any, fresh_start: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fresh_start = fresh_start

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.fresh_start:
            self.fresh_start = False
            return
        super().load_state_dict(state_dict)
