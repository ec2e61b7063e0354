"""Resuming checks what it resumes (`data/resume.py`): a checkpoint records the data and batching it was trained
on, and `--ckpt_path` with other data, batching, lengths, template or seed is refused naming what differs, within
seconds and with the earlier run untouched; the same bytes under another name resume; `data.resume_changed_data
true` goes on from the checkpoint's step on the new data.

The cases run the real command line in-process, in the workspace of tests/test_bad_input.py.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from lightning_qpeft.cli import main
from tests.conftest import write_jsonl
from tests.test_bad_input import ROOT, Workspace, workspace  # noqa: F401 (fixture)
from tests.test_config_ranges import assert_refused

RECORDS = [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(1, i + 1)))} for i in range(1, 41)]

# (kind, extra arguments on top of the workspace's run, regex of the refusal)
CHANGES = [
    ("another batch size", ["--data.batch_size", "8"], r"data.batch_size: checkpoint 16 vs this run 8"),
    ("another seed", ["--data.seed", "7"], r"data.seed: checkpoint 42 vs this run 7"),
    ("another prompt length", ["--data.source_max_len", "100"], r"data.source_max_len: checkpoint 128 vs this run 100"),
    ("another target length", ["--data.target_max_len", "8"], r"data.target_max_len: checkpoint 64 vs this run 8"),
    ("another template", ["--data.template", "plain"], r"data.template: checkpoint 'alpaca' vs this run 'plain'"),
    ("loss on the prompt too", ["--data.train_on_source", "true"], r"data.train_on_source: checkpoint False vs"),
    ("packing", ["--data.packing", "true"], r"data.packing: checkpoint False vs this run True"),
    ("length grouping", ["--data.group_by_length", "true"], r"data.group_by_length: checkpoint False vs this run True"),
    ("a token budget", ["--data.max_tokens", "1024"],
     r"data.batch_size: checkpoint 16 vs this run None\n  data.max_tokens: checkpoint None vs this run 1024"),
    ("fewer records", ["--data.max_train_records", "32"],
     r"data.max_train_records: checkpoint 64 vs this run 32\n.*training records: checkpoint 64 vs this run 32"),
    ("another task's data",
     lambda w: ["--data.task", "alpaca", "--data.path", write_jsonl(w.files / "a.jsonl", RECORDS)],
     r"data.task: checkpoint 'synthetic-e2e' vs this run 'alpaca'"),
]
REFUSAL = r"ckpt_path: the checkpoint was trained on other data or batches than this run's:\n  .*\nits saved place " \
          r"in the data would skip or repeat records; .* or set data.resume_changed_data=true"


@pytest.mark.parametrize("kind, extra, match", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_on_other_data_or_batches_is_refused_naming_what_differs(workspace, kind, extra, match, capsys):
    extra = extra(workspace) if callable(extra) else extra
    assert_refused(workspace, extra + ["--ckpt_path", workspace.last_ckpt], (REFUSAL, match), capsys)


@pytest.fixture(scope="module")
def file_run(tiny_model_dir, tmp_path_factory) -> dict:
    """A run of 2 steps on a JSON lines file, with validation split off it (4 records)."""
    root = tmp_path_factory.mktemp("file-run")
    data = write_jsonl(root / "records.jsonl", RECORDS)
    args = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
            "--trainer.default_root_dir", str(root / "run"), "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", "--generation_metrics.test",
            "false", "--data.task", "alpaca", "--data.batch_size", "8", "--data.val_size", "4"]
    main(args + ["--data.path", data, "--trainer.max_steps", "2"])
    ckpt = next((root / "run").rglob("last.ckpt"))
    return {"root": root, "args": args, "data": data, "ckpt": str(ckpt)}


def file_workspace(file_run) -> Workspace:
    return Workspace(file_run["args"][4], file_run["root"] / "run", file_run["root"])


def test_a_data_file_with_other_content_is_refused(file_run, capsys):
    edited = [dict(r) for r in RECORDS]
    edited[7]["output"] = "seven"
    other = write_jsonl(file_run["root"] / "edited.jsonl", edited)
    w, base = file_workspace(file_run), file_run["args"]
    assert_refused(w, ["--data.path", other, "--trainer.max_steps", "4", "--ckpt_path", file_run["ckpt"]],
                   r"data.path: checkpoint '.*records.jsonl' \(\d+ bytes, sha256 [0-9a-f]{12}\) vs this run "
                   r"'.*edited.jsonl' \(\d+ bytes, sha256 [0-9a-f]{12}\)", capsys, base)
    assert_refused(w, ["--data.path", file_run["data"], "--data.val_size", "6", "--trainer.max_steps", "4",
                       "--ckpt_path", file_run["ckpt"]], r"data.val_size: checkpoint 4 vs this run 6", capsys, base)


def steps_of(version: Path) -> int:
    return torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def test_the_same_bytes_under_another_name_resume(file_run):
    moved = file_run["root"] / "moved" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.copy(file_run["data"], moved)
    before = set((file_run["root"] / "run" / "lightning_logs").iterdir())
    main(file_run["args"] + ["--data.path", str(moved), "--trainer.max_steps", "3", "--ckpt_path", file_run["ckpt"]])
    new, = set((file_run["root"] / "run" / "lightning_logs").iterdir()) - before
    assert steps_of(new) == 3  # went on from step 2


def test_resume_changed_data_goes_on_from_the_step_on_the_new_data(file_run):
    other = write_jsonl(file_run["root"] / "more.jsonl", RECORDS + RECORDS[:8])
    before = set((file_run["root"] / "run" / "lightning_logs").iterdir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(file_run["args"] + ["--data.path", other, "--data.batch_size", "4", "--trainer.max_steps", "4",
                                 "--data.resume_changed_data", "true", "--ckpt_path", file_run["ckpt"]])
    said = [str(w.message) for w in caught if str(w.message).startswith("ckpt_path: data.resume_changed_data")]
    assert len(said) == 1 and re.search(r"data.resume_changed_data=true: the checkpoint was trained on other data or "
                                        r"batches \(data.path: .*; data.batch_size: checkpoint 8 vs this run 4; .*\); "
                                        r"its weights, optimizer and step carry on", said[0]), said
    new, = set((file_run["root"] / "run" / "lightning_logs").iterdir()) - before
    assert steps_of(new) == 4
