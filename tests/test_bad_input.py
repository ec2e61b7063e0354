"""Every kind of bad input a user can give `fit` (configs, data files, model folders, checkpoints, adapters)
fails with its own clear message naming the key or the file (and line), within seconds, and leaves the
outputs of an earlier run in the same folder untouched.

Each case runs the real command line (`lightning_qpeft.cli.main`) in-process on the tiny model, on top of
configs/tiny.yaml, in the folder where a good run has already written its checkpoints and adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from lightning_qpeft.cli import main

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 30  # generous for a loaded CI machine: each case fails in ~1-2 s here, before any training step


class RunsCode:
    """Pickles to a call of os.system: plain unpickling would run the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Workspace:
    """The earlier run and the files the cases point at."""

    tiny: str
    run: Path
    files: Path

    def write(self, name: str, text: str) -> str:
        path = self.files / name
        path.write_text(text)
        return str(path)

    def model_folder(self, name: str, edit: Callable[[Path], None]) -> str:
        """A copy of the tiny model folder, edited."""
        path = self.files / name
        if not path.exists():
            shutil.copytree(self.tiny, path)
            edit(path)
        return str(path)

    @property
    def last_ckpt(self) -> str:
        return str(next(self.run.rglob("last.ckpt")))

    @property
    def marker(self) -> Path:
        return self.files / "code-ran"


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _only_tokenizer(folder: Path, model_type: str) -> None:
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))


def _evil_adapter(w: Workspace) -> str:
    path = w.files / "evil-adapter"
    path.mkdir(exist_ok=True)
    shutil.copy(next(w.run.rglob("adapter_config.json")), path)
    torch.save({"base_model.model.lm_head.weight": RunsCode(w.marker)}, path / "adapter_model.bin")
    return str(path)


def _evil_ckpt(w: Workspace) -> str:
    path = w.files / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(w.marker)}, path)
    return str(path)


# (kind, extra command-line arguments, regex the message must match)
CASES: list[tuple[str, Callable[[Workspace], list[str]], str]] = [
    # --- configs
    ("misspelled key", lambda w: ["--model.quantisation", "nf4"], r"unrecognized arguments: --model.quantisation"),
    ("misspelled adapter field", lambda w: ["--model.adapter.init_args.rr", "4"], r"Option 'rr' is not accepted"),
    ("value of the wrong type", lambda w: ["--data.batch_size", "many"], r'key "data.batch_size"'),
    ("unknown quantization mode", lambda w: ["--model.quantization", "nf2"],
     r"model.quantization: unknown mode 'nf2'; choose one of none, nf4"),
    ("unknown task", lambda w: ["--data.task", "nope"], r"data.task: unknown task 'nope'"),
    ("config file with a YAML syntax error",
     lambda w: ["--config", w.write("bad.yaml", "model:\n  quantization: nf4\n  adapter: [unclosed\n")],
     r"Problems parsing config.*line 3"),
    ("config file that does not exist", lambda w: ["--config", str(w.files / "nope.yaml")],
     r"File does not exist: '.*nope.yaml'"),
    ("adapter refused on the quantization",
     lambda w: ["--model.adapter", "configs/adapter/pissa.yaml", "--model.quantization", "nf4"],
     r"model.adapter=pissa cannot run with model.quantization=nf4: PiSSA"),
    ("adapter refused with gradient checkpointing",
     lambda w: ["--model.adapter", "configs/adapter/prefix_tuning.yaml", "--model.gradient_checkpointing", "true"],
     r"model.adapter=prefix_tuning cannot run with model.gradient_checkpointing=true"),
    ("both adapter and adapter_path", lambda w: ["--model.adapter_path", str(w.run)],
     r"model.adapter and model.adapter_path: set one"),
    ("a run with no end and a step-laid schedule", lambda w: ["--trainer.max_steps", "-1", "--trainer.max_epochs", "-1"],
     r"model.lr_scheduler \(WarmupCosineLR\) is laid out over the run's optimizer steps.*set trainer.max_steps"),
    ("unknown non-finite policy", lambda w: ["--nonfinite.policy", "ignore"],
     r"nonfinite.policy: 'ignore'; choose skip or stop"),
    ("output folder not writable", lambda w: ["--trainer.default_root_dir", "/proc/qpeft-run"],
     r"trainer.default_root_dir: cannot write to '/proc/qpeft-run'"),
    # --- lengths and data
    ("a max length that leaves no target token", lambda w: ["--data.target_max_len", "0"],
     r"data.target_max_len: 0 leaves no target token"),
    ("zero training records", lambda w: ["--data.max_train_records", "0"], r"data.max_train_records: 0; give at least 1"),
    ("validation fraction of everything", lambda w: ["--data.val_size", "1.0"],
     r"data.val_size: 1.0; give a fraction in \(0, 1\)"),
    ("data file that does not exist", lambda w: ["--data.task", "alpaca", "--data.path", str(w.files / "no.json")],
     r"data.path: no such file: '.*no.json'"),
    ("malformed JSONL line",
     lambda w: ["--data.task", "alpaca", "--data.path",
                w.write("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')],
     r"cannot parse .*bad.jsonl:2"),
    ("record without its output",
     lambda w: ["--data.task", "alpaca", "--data.path",
                w.write("noout.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')],
     r"noout.jsonl: line 2 has no 'output' string"),
    ("output that is not text",
     lambda w: ["--data.task", "alpaca", "--data.path", w.write("num.jsonl", '{"instruction": "a", "output": 5}\n')],
     r"num.jsonl: line 1 has no 'output' string \(got 5\)"),
    ("empty data file", lambda w: ["--data.task", "alpaca", "--data.path", w.write("empty.json", "[]")],
     r"data.path: .*empty.json holds no records"),
    ("data file of blank lines", lambda w: ["--data.task", "alpaca", "--data.path", w.write("blank.jsonl", "\n \n\n")],
     r"data.path: .*blank.jsonl holds no records"),
    ("CSV without the task's columns",
     lambda w: ["--data.task", "samsum", "--data.path", w.write("s.csv", "id,dialogue\n1,hi\n")],
     r"s.csv: no 'output' field and no known column layout for task 'samsum'"),
    # --- model folders
    ("base model folder that does not exist", lambda w: ["--model.base_model", str(w.files / "no-model")],
     r"model.base_model unless set\): no folder at '.*no-model'"),
    ("folder with no tokenizer", lambda w: ["--model.base_model", str(w.files / "empty-folder")],
     r"model.base_model unless set\): '.*empty-folder' holds no tokenizer"),
    ("model that is not a causal LM",
     lambda w: ["--model.base_model", w.model_folder("t5", lambda p: _only_tokenizer(p, "t5"))],
     r"model.base_model: '.*t5' is a 't5' model, not a causal language model"),
    ("encoder model with a causal-LM head",
     lambda w: ["--model.base_model", w.model_folder("bert", lambda p: _only_tokenizer(p, "bert"))],
     r"model.base_model: '.*bert' is a 'bert' model, whose causal-LM head is an encoder's add-on"),
    ("model whose code would run on load",
     lambda w: ["--model.base_model", w.model_folder("remote", lambda p: _config(
         p, model_type="qpeft-custom",
         auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}))],
     r"model.base_model: cannot read the config of .*remote.*set model.trust_remote_code=true only if"),
    ("model folder without weights",
     lambda w: ["--model.base_model", w.model_folder("no-weights", lambda p: (p / "model.safetensors").unlink())],
     r"model.base_model: cannot load the weights of '.*no-weights'"),
    ("torn weights file",
     lambda w: ["--model.base_model", w.model_folder("torn", lambda p: (p / "model.safetensors").write_bytes(b"\0" * 99))],
     r"model.base_model: cannot load the weights of '.*torn': Error while deserializing header"),
    # --- checkpoints and adapters
    ("checkpoint that does not exist", lambda w: ["--ckpt_path", str(w.files / "no.ckpt")],
     r"ckpt_path: no checkpoint at '.*no.ckpt'"),
    ("checkpoint that is not one", lambda w: ["--ckpt_path", w.write("garbage.ckpt", "garbage")],
     r"ckpt_path: '.*garbage.ckpt' is not a readable checkpoint"),
    ("checkpoint crafted to run code", lambda w: ["--ckpt_path", _evil_ckpt(w)],
     r"ckpt_path: '.*evil.ckpt' holds more than tensors and plain data \(refused: loading it could run code"),
    ("checkpoint of another adapter", lambda w: ["--ckpt_path", w.last_ckpt, "--model.adapter.init_args.r", "4"],
     r"does not match this configuration:\n  model.adapter.r: checkpoint 16 vs config 4"),
    ("checkpoint of another quantization", lambda w: ["--ckpt_path", w.last_ckpt, "--model.quantization", "fp4"],
     r"does not match this configuration:\n  quantization: checkpoint 'nf4-dq' vs config 'fp4'"),
    ("checkpoint of another base",
     lambda w: ["--ckpt_path", w.last_ckpt, "--model.base_model", w.model_folder("other-base", lambda p: None)],
     r"does not match this configuration:\n  base_model: checkpoint '.*' vs config '.*other-base'"),
    ("adapter folder without an adapter",
     lambda w: ["--model.adapter", "null", "--model.adapter_path", str(w.files / "empty-folder")],
     r"model.adapter_path: '.*empty-folder' is not a peft adapter folder"),
    ("adapter file crafted to run code", lambda w: ["--model.adapter", "null", "--model.adapter_path", _evil_adapter(w)],
     r"model.adapter_path: '.*evil-adapter' holds a pickle with more than tensors \(refused"),
]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tiny_model_dir, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("bad-input")
    w = Workspace(tiny_model_dir, root / "run", root / "files")
    w.files.mkdir()
    (w.files / "empty-folder").mkdir()
    main(base_args(w) + ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    assert (next(w.run.rglob("adapter_model.safetensors"))).exists()
    return w


def base_args(w: Workspace) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", w.tiny,
            "--trainer.default_root_dir", str(w.run), "--trainer.enable_progress_bar", "false",
            "--trainer.max_steps", "4", "--trainer.limit_val_batches", "2", "--generation_metrics.test", "false",
            "--data.max_train_records", "64"]


def test_there_are_at_least_twenty_kinds_each_with_its_own_message():
    assert len(CASES) >= 20
    assert len({kind for kind, _, _ in CASES}) == len(CASES)
    assert len({match for _, _, match in CASES}) == len(CASES)


@pytest.mark.parametrize("kind, extra, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_fast_and_keeps_earlier_outputs(workspace, kind, extra, match, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/adapter/*.yaml paths as a user in the checkout gives them
    before = digest(workspace.run)
    args = base_args(workspace) + extra(workspace)
    start = time.monotonic()
    with pytest.raises((SystemExit, Exception)) as failure:
        main(args)
    elapsed = time.monotonic() - start
    message = capsys.readouterr().err if isinstance(failure.value, SystemExit) else str(failure.value)
    if isinstance(failure.value, SystemExit):
        assert failure.value.code == 2, message[-2000:]
    assert re.search(match, message, flags=re.S), message[-2000:]
    assert elapsed < SECONDS, f"{kind}: {elapsed:.1f} s"
    after = digest(workspace.run)
    assert {k: after.get(k) for k in before} == before  # nothing the earlier run wrote is changed or gone
    assert not workspace.marker.exists()  # no crafted file ran its code
