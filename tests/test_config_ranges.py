"""Every numeric config key has a range, checked by the CLI before anything loads (`config_ranges.py`): a value
outside it fails within seconds naming the key and the value, and the earlier run's outputs stay as they were.

The cases run the real command line in-process, as tests/test_bad_input.py does, in its workspace.
"""

from __future__ import annotations

import copy
import functools
import re
import time
import warnings
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from lightning_qpeft.cli import QPeftCLI, main
from lightning_qpeft.config_ranges import RULES, check_config, numeric_leaves, rule_for
from tests.conftest import write_jsonl
from tests.test_bad_input import ROOT, SECONDS, Workspace, base_args, digest, workspace  # noqa: F401 (fixture)

# the class a rule's key belongs to, as command-line arguments (tiny.yaml has AdamW, WarmupCosineLR and LoRA)
SGD = ["--model.optimizer", "torch.optim.SGD"]
PAGED = ["--model.optimizer", "bitsandbytes.optim.PagedAdamW32bit"]
STEP_LR = ["--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.init_args.step_size", "10"]
LINEAR_LR = ["--model.lr_scheduler", "torch.optim.lr_scheduler.LinearLR"]
COSINE_LR = ["--model.lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR",
             "--model.lr_scheduler.init_args.T_max", "10"]


def adapter(name: str) -> list[str]:
    return ["--model.adapter", f"configs/adapter/{name}.yaml"]


CONTEXT: dict[str, list[str]] = {
    "model.optimizer.init_args.momentum": SGD, "model.optimizer.init_args.dampening": SGD,
    "model.optimizer.init_args.min_8bit_size": PAGED, "model.optimizer.init_args.optim_bits": PAGED,
    "model.lr_scheduler.init_args.step_size": STEP_LR, "model.lr_scheduler.init_args.gamma": STEP_LR,
    "model.lr_scheduler.init_args.start_factor": LINEAR_LR, "model.lr_scheduler.init_args.end_factor": LINEAR_LR,
    "model.lr_scheduler.init_args.total_iters": LINEAR_LR,
    "model.lr_scheduler.init_args.T_max": COSINE_LR, "model.lr_scheduler.init_args.eta_min": COSINE_LR,
    "model.adapter.init_args.alpha": adapter("loha"),
    "model.adapter.init_args.num_virtual_tokens": adapter("prompt_tuning"),
    "model.adapter.init_args.encoder_hidden_size": adapter("p_tuning"),
    "model.adapter.init_args.oft_block_size": adapter("oft"),
    **{f"model.adapter.init_args.{k}": adapter("adalora")
       for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")},
    **{f"model.adapter.init_args.boft_{k}": adapter("boft") for k in ("block_size", "block_num", "n_butterfly_factor")},
    # a run of epochs, so that max_epochs is what is checked
    "trainer.max_epochs": ["--trainer.max_steps", "-1"],
}
CONCRETE = {"model.adapter.init_args.*dropout": "model.adapter.init_args.lora_dropout",
            "model.optimizer.init_args.betas.*": "model.optimizer.init_args.betas"}


def arguments(pattern: str, value) -> list[str]:
    key = CONCRETE.get(pattern, pattern)
    if key.endswith("betas"):
        return CONTEXT.get(pattern, []) + [f"--{key}=[{value}, 0.999]"]
    return CONTEXT.get(pattern, []) + [f"--{key}", str(value)]


def refusal(pattern: str, value) -> str:
    key = CONCRETE.get(pattern, pattern).replace("betas", "betas.0")
    return rf"{re.escape(key)}: {re.escape(str(value))}(\.0)?[; ]"


def section(pattern: str) -> str:
    parts = pattern.split(".")
    return ".".join(parts[:2]) if parts[0] == "model" else parts[0]


# through the real command line: the first rule of every config section, with its first out-of-range value (every
# rule and every such value go through the same check in test_every_out_of_range_value_is_refused_by_the_check)
FIRST_OF_SECTION = {}
for _pattern, _rule in RULES.items():
    FIRST_OF_SECTION.setdefault(section(_pattern), (_pattern, _rule))
RULE_CASES = [pytest.param(arguments(p, r.bad[0]), refusal(p, r.bad[0]), id=p) for p, r in FIRST_OF_SECTION.values()]

# the inputs of issue 17 and their neighbours, each with the message it must give
ISSUE_CASES = [
    ("negative batch size", ["--data.batch_size", "-1"], r"data.batch_size: -1; give at least 1"),
    ("zero batch size", ["--data.batch_size", "0"], r"data.batch_size: 0; give at least 1"),
    ("negative min_lr_ratio", ["--model.lr_scheduler.init_args.min_lr_ratio", "-1"],
     r"min_lr_ratio: -1.0; give a number in \[0, 1\]"),
    ("negative learning rate", ["--model.optimizer.init_args.lr", "-0.003"],
     r"model.optimizer.init_args.lr: -0.003; give a number > 0 \(a negative rate climbs the loss\)"),
    ("accumulation of no micro-batch", ["--trainer.accumulate_grad_batches", "0"],
     r"trainer.accumulate_grad_batches: 0; give at least 1"),
    ("no training batch", ["--trainer.limit_train_batches", "0"],
     r"trainer.limit_train_batches: 0; give an integer >= 1 \(0 would train nothing\)"),
    ("no training fraction", ["--trainer.limit_train_batches", "0.0"], r"trainer.limit_train_batches: 0.0; give"),
    ("no optimizer step", ["--trainer.max_steps", "0"], r"trainer.max_steps: 0; give at least 1"),
    ("no epoch", ["--trainer.max_steps", "-1", "--trainer.max_epochs", "0"], r"trainer.max_epochs: 0; give"),
    ("validation count written as a float", ["--data.val_size", "5.0"],
     r"data.val_size: 5.0; give a fraction in \(0, 1\) \(a float, e.g. 0.05\) or a record count >= 1 \(an integer"),
    ("validation count of every record",
     lambda w: ["--data.task", "alpaca", "--data.path", alpaca_records(w.files / "forty.jsonl"),
                "--data.val_size", "40"],
     r"data.val_size: 40 leaves no training record of the 40; give a smaller count"),
    ("seed outside numpy's range", ["--seed_everything", "-1"], r"seed_everything: -1; give an integer in \[0, "),
    ("records longer than the model's positions", ["--data.source_max_len", "500"],
     r"data.source_max_len \+ data.target_max_len: 500 \+ 64 = 564 tokens exceed the 512 positions of "
     r"model.base_model \(.*max_position_embeddings\); lower them"),
    ("every target empty",
     lambda w: ["--data.task", "alpaca", "--data.path",
                w.write("empty-targets.jsonl",
                        '{"instruction": "a", "output": ""}\n{"instruction": "b", "output": " "}\n')],
     r"empty-targets.jsonl: every training record's output is empty, so the run would learn only to stop"),
]


def alpaca_records(path: Path, n: int = 40) -> str:
    return write_jsonl(path, [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))}
                              for i in range(1, n + 1)])


def assert_refused(w: Workspace, extra: list[str], match: str | tuple[str, ...], capsys,
                   base: list[str] | None = None) -> None:
    """The real command line (`base`: the workspace's run) refuses `extra` with a message matching `match` (each of
    them), fast, and changes nothing the earlier run wrote."""
    before = digest(w.run)
    start = time.monotonic()
    with pytest.raises((SystemExit, Exception)) as failure:
        main((base_args(w) if base is None else base) + extra)
    elapsed = time.monotonic() - start
    message = capsys.readouterr().err if isinstance(failure.value, SystemExit) else str(failure.value)
    if isinstance(failure.value, SystemExit):
        assert failure.value.code == 2, message[-2000:]
    for m in (match,) if isinstance(match, str) else match:
        assert re.search(m, message, flags=re.S), message[-2000:]
    assert elapsed < SECONDS, f"{elapsed:.1f} s"
    after = digest(w.run)
    assert {k: after.get(k) for k in before} == before


@pytest.mark.parametrize("extra, match", RULE_CASES)
def test_each_config_section_refuses_a_value_outside_its_range(workspace, extra, match, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/adapter/*.yaml as a user in the checkout gives them
    assert_refused(workspace, extra, match, capsys)


@pytest.mark.parametrize("kind, extra, match", ISSUE_CASES, ids=[c[0] for c in ISSUE_CASES])
def test_inputs_that_used_to_get_through_are_refused(workspace, kind, extra, match, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert_refused(workspace, extra(workspace) if callable(extra) else extra, match, capsys)


class _Parsed(Exception):
    pass


class _ParseOnly(QPeftCLI):
    """Parses (and range-checks) the command line, then stops: nothing is built."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


def parsed(*args: str):
    with pytest.raises(_Parsed) as caught:
        _ParseOnly(args=list(args), run=False)
    return caught.value.args[0]


@functools.lru_cache(maxsize=None)
def parsed_with(context: tuple[str, ...]):
    return parsed("--config", str(ROOT / "configs" / "tiny.yaml"), *context)


@pytest.mark.parametrize("pattern", list(RULES))
def test_every_out_of_range_value_is_refused_by_the_check(pattern, monkeypatch):
    monkeypatch.chdir(ROOT)
    rule = RULES[pattern]
    config = parsed_with(tuple(CONTEXT.get(pattern, [])))
    key = CONCRETE.get(pattern, pattern)
    assert rule_for(key.replace("betas", "betas.0"), config) is rule
    check_config(config)  # the config as given is in range
    assert rule.bad, pattern
    for value in rule.bad:
        bad = copy.deepcopy(config)
        bad[key] = (value, 0.999) if key.endswith("betas") else value
        with pytest.raises(ValueError, match=refusal(pattern, value)):
            check_config(bad)


RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                     if p.parent.name not in ("adapter", "study") or p.parent.parent.name == "study")


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_numeric_key_of_every_run_config_has_a_range(config, tiny_model_dir):
    """The run configs' numeric keys (their values and every default the CLI fills in) all have a rule, and
    their values are in range. peft's own fields are peft's to check, except those our adapter configs set."""
    cfg = parsed("--config", str(config), "--model.base_model", tiny_model_dir)
    unruled = [k for k, v in numeric_leaves(cfg).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not k.startswith("model.adapter.init_args.")
               and rule_for(k, cfg) is None]
    assert not unruled, f"numeric keys without a range: {unruled}; add them to config_ranges.RULES"
    check_config(cfg)


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "adapter").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_numeric_field_an_adapter_config_sets_has_a_range(config):
    spec = yaml.safe_load(config.read_text())
    fields = {k: v for k, v in (spec.get("init_args") or {}).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    cfg = Namespace({"model.adapter.class_path": spec["class_path"]})
    unruled = [k for k in fields if rule_for(f"model.adapter.init_args.{k}", cfg) is None
               and not (k == "r" and spec["class_path"].endswith(("OFTConfig",)))]
    assert not unruled, f"{config.name}: fields without a range: {unruled}"


def test_val_size_given_as_an_integer_is_a_record_count(tiny_model_dir, tmp_path):
    cli = QPeftCLI(args=["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
                         "--data.task", "alpaca", "--data.path", alpaca_records(tmp_path / "forty.jsonl"),
                         "--data.val_size", "5", "--trainer.logger", "false"], run=False)
    assert cli.datamodule.val_size == 5 and isinstance(cli.datamodule.val_size, int)
    cli.datamodule.setup("fit")
    assert len(cli.datamodule.records["validation"]) == 5 and len(cli.datamodule.records["train"]) == 35


def test_a_warmup_longer_than_the_run_is_warned_about(tiny_model_dir, tmp_path):
    args = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
            "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--generation_metrics.test", "false",
            "--data.max_train_records", "32", "--adapter_export.enabled", "false", "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.callbacks=[]"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(args)
    assert any(re.search(r"warmup_steps: 20 is not below the run's 2 optimizer steps \(trainer.max_steps / "
                         r"trainer.max_epochs\): the learning rate never reaches its peak", str(w.message))
               for w in caught), [str(w.message) for w in caught]


def test_the_range_rules_match_their_keys_by_class():
    oft = Namespace({"model.adapter.class_path": "peft.OFTConfig"})
    assert rule_for("model.adapter.init_args.r", oft) is None  # OFT's r=0 means "from oft_block_size"
    assert rule_for("model.adapter.init_args.r", Namespace({"model.adapter.class_path": "peft.LoraConfig"}))
