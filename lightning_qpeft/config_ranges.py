"""The allowed range of every numeric config key, checked by the CLI before anything is built or loaded.

`check_config` walks the parsed config (`model.*`, `data.*`, `trainer.*`, the callback sections, the
optimizer's, scheduler's and adapter's `init_args`) and refuses the first value outside its range with the key,
the value and what to give instead. A value that would make a run train on nothing (`trainer.max_steps 0`,
`trainer.limit_train_batches 0`, `data.batch_size 0`) or train the wrong way (a negative learning rate or
`min_lr_ratio`) is out of range like any other. `check_positions` adds the check that needs the model's config
(`data.source_max_len + data.target_max_len` against the model's positions). A warm-up longer than the run is
warned about where the run's length is known (`schedules.WarmupCosineLR.set_total_steps`).

Keys are patterns (`fnmatch`): `model.optimizer.init_args.lr` applies to whichever optimizer class is given,
`model.adapter.init_args.*dropout` to every adapter's dropout. A key no rule names is left to the class that
takes it (peft's configs check their own fields in `__post_init__`, still before any weight loads).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from lightning_qpeft.core.errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed range


@dataclass(frozen=True)
class Rule:
    """The allowed values of a numeric key.

    Attributes:
        ok: value -> allowed (None has already been let through when `optional`).
        allowed: the allowed values in words, for messages ("at least 1 (records per micro-batch)").
        bad: values outside the range (tests give each to the CLI and expect a refusal).
        optional: None (unset) is allowed.
        classes: the rule applies only when the section's class_path ends with one of these (empty: any class).
        reason: what the value would do, where that says more than the range (" leaves no target token").
    """

    ok: Callable[[Any], bool]
    allowed: str
    bad: tuple = ()
    optional: bool = False
    classes: tuple[str, ...] = ()
    reason: str = ""

    def message(self, key: str, value: Any) -> str:
        return str(self.refusal(key, value))

    def refusal(self, key: str, value: Any) -> ConfigError:
        unset = ", or leave it unset" if self.optional else ""
        return ConfigError(key, f"{value!r}{self.reason}", f"give {self.allowed}{unset}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def count(low: int = 1, what: str = "", optional: bool = False, unlimited: str = "",
          classes: tuple[str, ...] = (), reason: str = "") -> Rule:
    """An integer >= `low`, or -1 where `unlimited` says what -1 means."""
    words = f"at least {low}" + (f" ({what})" if what else "") + (f", or -1 ({unlimited})" if unlimited else "")
    bad = tuple(b for b in (low - 1, -2) if b != -1) if unlimited else (low - 1,)
    return Rule(lambda v: _int(v) and (v >= low or (unlimited and v == -1)), words, bad, optional, classes, reason)


def interval(low: float, high: Optional[float], low_open: bool = False, high_open: bool = False,
             what: str = "", optional: bool = False, classes: tuple[str, ...] = ()) -> Rule:
    """A number from `low` to `high` (None: unbounded), each end included unless open."""
    def ok(v: Any) -> bool:
        if not _num(v) or v != v:  # NaN
            return False
        if v < low or (low_open and v == low):
            return False
        return high is None or (v < high if high_open else v <= high)

    if high is None:
        words = f"a number {'>' if low_open else '>='} {low:g}"
        bad: tuple = (low if low_open else low - 1,)
    else:
        words = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        bad = (low if low_open else low - 1, high if high_open else high + 1)
    return Rule(ok, words + (f" ({what})" if what else ""), bad, optional, classes)


def batches(low: int, what: str) -> Rule:
    """Lightning's count-or-fraction keys: an integer >= `low` (batches) or a fraction (of the loader)."""
    frac = "(0, 1]" if low >= 1 else "[0, 1]"
    return Rule(lambda v: (_int(v) and v >= low) or (isinstance(v, float) and (0 < v <= 1 if low else 0 <= v <= 1)),
                f"an integer >= {low} ({what}) or a fraction in {frac}", (low - 1, 1.5) if low else (-1, 1.5),
                optional=True)


SEED = Rule(lambda v: _int(v) and 0 <= v <= SEED_MAX, f"an integer in [0, {SEED_MAX}]", (-1, SEED_MAX + 1))
DROPOUT = interval(0, 1, high_open=True, what="a probability")
VAL_SIZE = Rule(lambda v: (_int(v) and v >= 1) or (isinstance(v, float) and 0 < v < 1),
                "a fraction in (0, 1) (a float, e.g. 0.05) or a record count >= 1 (an integer, e.g. 5)",
                (0, -1, 1.0, 2.5))

RULES: dict[str, Rule] = {
    # --- data
    "data.batch_size": count(1, "records per training micro-batch"),
    "data.eval_batch_size": count(1, "records per evaluation batch", optional=True),
    "data.source_max_len": count(1, "prompt tokens"),
    "data.target_max_len": count(1, "target tokens; EOS is one", reason=" leaves no target token"),
    "data.val_size": VAL_SIZE,
    "data.max_train_records": count(1, optional=True),
    "data.pad_to_multiple_of": count(1, optional=True),
    "data.max_tokens": count(1, "tokens per training micro-batch", optional=True),
    "data.num_workers": count(0, "0: load in the main process"),
    "data.seed": SEED,
    "seed_everything": SEED,
    # --- model
    "model.generation.max_new_tokens": count(1),
    "model.generation.num_beams": count(1, "1: no beam search"),
    "model.generation.temperature": interval(0, None, low_open=True),
    "model.generation.top_p": interval(0, 1, low_open=True),
    "model.optimizer.init_args.lr": interval(0, None, low_open=True, what="a negative rate climbs the loss"),
    "model.optimizer.init_args.weight_decay": interval(0, None),
    "model.optimizer.init_args.eps": interval(0, None, low_open=True),
    "model.optimizer.init_args.momentum": interval(0, 1, high_open=True),
    "model.optimizer.init_args.dampening": interval(0, 1),
    "model.optimizer.init_args.betas.*": interval(0, 1, high_open=True),
    "model.optimizer.init_args.min_8bit_size": count(0),
    "model.optimizer.init_args.optim_bits": Rule(lambda v: v in (8, 32), "8 or 32", (16,)),
    "model.lr_scheduler.init_args.warmup_steps": count(0, "optimizer steps"),
    "model.lr_scheduler.init_args.total_steps": count(1, optional=True),
    "model.lr_scheduler.init_args.min_lr_ratio": interval(0, 1, what="a fraction of the peak rate"),
    "model.lr_scheduler.init_args.step_size": count(1),
    "model.lr_scheduler.init_args.gamma": interval(0, None, low_open=True),
    "model.lr_scheduler.init_args.start_factor": interval(0, 1, low_open=True),
    "model.lr_scheduler.init_args.end_factor": interval(0, 1),
    "model.lr_scheduler.init_args.total_iters": count(1),
    "model.lr_scheduler.init_args.T_max": count(1),
    "model.lr_scheduler.init_args.eta_min": interval(0, None),
    # adapters: the fields the configs under configs/adapter set (peft checks the rest itself)
    "model.adapter.init_args.*dropout": DROPOUT,
    "model.adapter.init_args.r": count(1, "the adapter's rank", classes=(
        "LoraConfig", "AdaLoraConfig", "LoHaConfig", "LoKrConfig", "HRAConfig", "VeraConfig")),
    "model.adapter.init_args.lora_alpha": interval(0, None, low_open=True),
    "model.adapter.init_args.alpha": interval(0, None, low_open=True),
    "model.adapter.init_args.init_r": count(1),
    "model.adapter.init_args.target_r": count(1),
    "model.adapter.init_args.tinit": count(0),
    "model.adapter.init_args.tfinal": count(0),
    "model.adapter.init_args.deltaT": count(1),
    "model.adapter.init_args.beta1": interval(0, 1, high_open=True),
    "model.adapter.init_args.beta2": interval(0, 1, high_open=True),
    "model.adapter.init_args.orth_reg_weight": interval(0, None),
    "model.adapter.init_args.num_virtual_tokens": count(1),
    "model.adapter.init_args.encoder_hidden_size": count(1, optional=True),
    "model.adapter.init_args.oft_block_size": count(0, "0: set by r"),
    "model.adapter.init_args.boft_block_size": count(0, "0: set by boft_block_num"),
    "model.adapter.init_args.boft_block_num": count(0, "0: set by boft_block_size"),
    "model.adapter.init_args.boft_n_butterfly_factor": count(1),
    # --- callbacks
    "nonfinite.max_skips": count(1),
    "efficiency.warmup_steps": count(0),
    "efficiency.warmup_epochs": count(0),
    "efficiency.window": count(1, "optimizer steps"),
    "efficiency.profile_steps": count(0),
    "efficiency.peak_flops": interval(0, None, low_open=True, optional=True),
    "generation_metrics.fit_every_n_val": count(0, "0: never during fit"),
    "generation_metrics.max_records": count(1, optional=True),
    "generation_metrics.batch_size": count(1, optional=True),
    "mmlu.shots": count(0),
    "mmlu.max_prompt_tokens": count(1),
    "mmlu.max_length": count(1),
    "mmlu.max_samples": count(1, optional=True),
    "mmlu.sample_seed": Rule(SEED.ok, SEED.allowed, SEED.bad, optional=True),
    "mmlu.every_n_validations": count(1),
    "mmlu.batch_tokens": count(1),
    "mmlu.batch_size": count(1),
    "mmlu.synthetic_questions": count(1),
    # --- trainer
    "trainer.max_steps": count(1, "optimizer steps; 0 would train nothing", unlimited="no limit"),
    "trainer.max_epochs": count(1, "0 would train nothing", optional=True, unlimited="no limit"),
    "trainer.min_steps": count(0, optional=True),
    "trainer.min_epochs": count(0, optional=True),
    "trainer.accumulate_grad_batches": count(1, "micro-batches per optimizer step"),
    "trainer.limit_train_batches": batches(1, "0 would train nothing"),
    "trainer.limit_val_batches": batches(0, "0: no validation"),
    "trainer.limit_test_batches": batches(0, "0: no test"),
    "trainer.limit_predict_batches": batches(0, "0: no prediction"),
    "trainer.overfit_batches": batches(0, "0: off"),
    "trainer.val_check_interval": batches(1, "training batches between validations"),
    "trainer.check_val_every_n_epoch": count(1, optional=True),
    "trainer.log_every_n_steps": count(1, optional=True),
    "trainer.num_sanity_val_steps": count(0, optional=True, unlimited="the whole validation set"),
    "trainer.gradient_clip_val": interval(0, None, what="0: no clipping", optional=True),
    "trainer.num_nodes": count(1),
    "trainer.devices": count(1, unlimited="every device"),
    "trainer.reload_dataloaders_every_n_epochs": count(0),
}
# trainer.devices is also a string ("auto", "0,1"): only its integers are checked
STRINGS_ALLOWED = {"trainer.devices", "trainer.limit_train_batches", "trainer.val_check_interval"}


def rule_for(key: str, config: Any = None) -> Optional[Rule]:
    """The rule of a flattened config key (`model.optimizer.init_args.betas.0` for tuple items), or None."""
    for pattern, rule in RULES.items():
        if fnmatch.fnmatchcase(key, pattern):
            if rule.classes and config is not None:
                section = key.split(".init_args.")[0]
                class_path = config.get(f"{section}.class_path") or ""
                if not class_path.endswith(rule.classes):
                    return None
            return rule
    return None


def numeric_leaves(config: Any) -> dict[str, Any]:
    """Flattened key -> value for every leaf of a jsonargparse Namespace; list/tuple items as `key.i`."""
    leaves: dict[str, Any] = {}
    for key in config.keys():
        value = config.get(key)
        if isinstance(value, (list, tuple)) and all(_num(v) for v in value):
            leaves.update({f"{key}.{i}": v for i, v in enumerate(value)})
        else:
            leaves[key] = value
    return leaves


def check_config(config: Any) -> None:
    """Refuse the first numeric key outside its range (`RULES`).

    Raises:
        ValueError: naming the key, the value and the allowed values.
    """
    for key, value in numeric_leaves(config).items():
        if isinstance(value, str) and key in STRINGS_ALLOWED:
            try:  # "auto", "0,1" and "1.0" are Lightning's to read; a plain integer is checked as one
                value = int(value)
            except ValueError:
                continue
        if isinstance(value, bool):
            continue
        rule = rule_for(key, config)
        if rule is None or (value is None and rule.optional):
            continue
        if not rule.ok(value):
            raise rule.refusal(key, value)


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_positions(folder: str) -> Optional[tuple[int, str]]:
    """(positions, config field) of a local model folder's config.json; None when it has none we know."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    config = {**config.get("text_config", {}), **config}
    for name in POSITION_FIELDS:
        if _int(config.get(name)) and config[name] > 0:
            return config[name], name
    return None


def check_positions(source_max_len: int, target_max_len: int, folder: str) -> None:
    """Refuse a longest record (prompt + target) beyond the positions the model has.

    Packed rows restart their position ids at every record, so the record, not the row, is what must fit.
    """
    found = model_positions(folder)
    if found is None:
        return
    positions, field = found
    if source_max_len + target_max_len > positions:
        raise ConfigError(
            "data.source_max_len", f"{source_max_len} + {target_max_len} = "
            f"{source_max_len + target_max_len} tokens exceed the {positions} positions of model.base_model "
            f"({folder}, {field})", f"lower them so that they add up to at most {positions}",
            head="data.source_max_len + data.target_max_len")
