"""The command line: LightningCLI over `QPeftModule` and `NLGDataModule`.

    python -m lightning_qpeft {fit,validate,test,predict} --config FILE [--key value ...]

Besides `model.*`, `data.*` and `trainer.*`, the config has top-level sections for the callbacks every run
gets: `adapter_export` (peft export at the end of fit), `efficiency` (tokens/s, peak memory, MFU; a summary in
`<log_dir>/perf.json`), `nonfinite` (skip or stop on a NaN/Inf loss or gradient), `preemption` (a checkpoint on
SIGTERM), `generation_metrics` (ROUGE/BLEU of generated text at test/validate,
callbacks/generation_metrics.py), `mmlu` (MMLU during fit and in validate/test; off unless `mmlu.enabled: true`)
and `prediction_writer` (JSONL output of predict).
Every run with a logger (TensorBoard by default; any `--trainer.logger`) also writes `<log_dir>/metrics.jsonl`
(callbacks/metrics_file.py), which the study reads.
`data.tokenizer` is linked to `model.tokenizer`, which defaults to `model.base_model`: the data is always tokenized
with the model's own tokenizer. Adapter fields that the run decides (a text-initialised prompt's tokenizer,
AdaLoRA's total_step) are filled before the adapter config is instantiated (`adapters.complete_run_fields`).
"""

from __future__ import annotations

import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_qpeft import config_ranges
from lightning_qpeft.callbacks import (
    AdapterExport,
    EfficiencyMonitor,
    GenerationMetrics,
    JsonlPredictionWriter,
    MMLUEvaluation,
    NonFiniteGuard,
    PreemptionCheckpoint,
)
from lightning_qpeft.callbacks.metrics_file import MetricsFile
from lightning_qpeft.callbacks.progress import QPeftProgressBar
from lightning_qpeft.checkpointing import checkpoint_problem
from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.distributed import register_strategies
from lightning_qpeft.failed_runs import removed_if_failed_early
from lightning_qpeft.model.adapters import complete_run_fields
from lightning_qpeft.model.module import QPeftModule

register_strategies()  # --trainer.strategy fsdp -> QPeftFSDPStrategy (see distributed.py)
# jsonargparse fills LoraConfig's `loftq_config` with LoftQConfig's defaults, so peft warned on every LoRA run that a
# loftq_config nobody set would be ignored (LoftQ itself: configs/adapter/loftq.yaml, via model/adapters.py)
warnings.filterwarnings("ignore", message="`loftq_config` specified but will be ignored")

TRAINER_DEFAULTS: dict[str, Any] = {
    "precision": "bf16-mixed",
    "plugins": [{"class_path": "lightning_qpeft.checkpointing.AtomicCheckpointIO"}],
}


class QPeftCLI(LightningCLI):
    """LightningCLI with the project's links and always-on callbacks."""

    def __init__(self, args: Any = None, run: bool = True) -> None:
        super().__init__(
            QPeftModule,
            NLGDataModule,
            seed_everything_default=42,
            trainer_defaults=TRAINER_DEFAULTS,
            auto_configure_optimizers=False,  # QPeftModule takes optimizer/lr_scheduler as init arguments
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would overwrite the user's model config with the checkpoint's hyperparameters. We keep
        # the config as given and let QPeftModule.on_load_checkpoint refuse a checkpoint that does not match
        # it, saying what differs: a silent override would resume something other than what was asked for.
        return

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        if config.get("enable_progress_bar", True) is not False and not any(
                isinstance(cb, ProgressBar) for cb in [*listed, *callbacks]):
            callbacks = [*callbacks, QPeftProgressBar()]  # Lightning's bar + tok/s and the run's eta
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.loggers:  # every logged metric also goes to <log_dir>/metrics.jsonl, whatever the logger
            trainer.loggers = [*trainer.loggers, MetricsFile(trainer)]
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # every numeric key in its range, before the seed is set, any class is built or anything loaded
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        config_ranges.check_config(config)
        base = Path(config.model.base_model).expanduser()
        if subcommand and (base / "config.json").is_file():  # a run (not an instantiation: run=False) of this model
            config_ranges.check_positions(config.data.source_max_len, config.data.target_max_len, str(base))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.model.adapter is not None:
            complete_run_fields(config.model.adapter, config.model.tokenizer or config.model.base_model)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(("model.base_model", "model.tokenizer"), "data.tokenizer", compute_fn=_tokenizer_of)
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.add_lightning_class_args(AdapterExport, "adapter_export")
        parser.add_lightning_class_args(EfficiencyMonitor, "efficiency")
        parser.add_lightning_class_args(JsonlPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(GenerationMetrics, "generation_metrics")
        parser.add_lightning_class_args(MMLUEvaluation, "mmlu")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")

    def before_fit(self) -> None:
        check_writable(self.trainer.default_root_dir, "trainer.default_root_dir")
        if self.config_init["fit"].get("ckpt_path") == "last":
            self.config_init["fit"]["ckpt_path"] = find_last_checkpoint(self.trainer)

    def fit(self, **kwargs: Any) -> None:
        """`trainer.fit`; a run that fails before training leaves no version folder (`failed_runs.py`)."""
        with removed_if_failed_early(self.trainer):
            self.trainer.fit(**kwargs)


def check_writable(folder: str, key: str) -> None:
    """Refuse, before any model loads, an output folder the run could not write to."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PermissionError(f"{key}: cannot write to {str(path)!r} ({e.strerror}); choose a writable folder") from None


def find_last_checkpoint(trainer: Any) -> Optional[str]:
    """`--ckpt_path last`: the newest intact last*.ckpt of this run's checkpoint folders, or None (a fresh start).

    Lightning looks for "last" only in the new run's own version folder, which a restarted job has not
    written yet; a preempted or killed run is resumed from the folder of the run it continues. The folders
    are searched in order and the first that holds a last*.ckpt wins: the checkpoint callback's `dirpath`,
    then the logger's versions (`<save_dir>/<name>/version_*/checkpoints`), then
    `<default_root_dir>/checkpoints` (no logger). Nothing wider: `default_root_dir` may hold other runs.
    With none found the run starts from scratch, as Lightning's own "last" does, so that a job script can
    pass `--ckpt_path last` on its first launch and on every requeue. A torn last*.ckpt (a disk that filled,
    a copy cut short: `checkpointing.checkpoint_problem`) is passed over, with a warning, for the newest intact
    checkpoint of the same folders; if none is intact the run is refused rather than started over.
    """
    searched = []
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "dirpath", None):
            searched.append((Path(cb.dirpath), "last*.ckpt"))
    if trainer.loggers and trainer.loggers[0].save_dir is not None:
        logger = trainer.loggers[0]
        searched.append((Path(logger.save_dir) / (logger.name or ""), "*/checkpoints/last*.ckpt"))
    searched.append((Path(trainer.default_root_dir) / "checkpoints", "last*.ckpt"))
    for folder, pattern in searched:
        found = [p for p in folder.glob(pattern) if p.is_file()] if folder.is_dir() else []
        if found:
            return _newest_intact(max(found, key=lambda p: p.stat().st_mtime), folder, pattern)
    rank_zero_warn("ckpt_path=last: no last*.ckpt under " + ", ".join(str(f) for f, _ in searched)
                   + "; training starts from scratch")
    return None


def _newest_intact(last: Path, folder: Path, pattern: str) -> str:
    """`last` if intact, else the newest intact checkpoint beside it (any name), with a warning; refused if none."""
    problem = checkpoint_problem(last)
    if problem is None:
        return str(last)
    others = sorted((p for p in folder.glob(pattern.replace("last*", "*")) if p.is_file() and p != last),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in others:
        if checkpoint_problem(candidate) is None:
            rank_zero_warn(f"ckpt_path=last: {last} is torn ({problem}); resuming from {candidate}, the newest intact "
                           "checkpoint")
            return str(candidate)
    raise ConfigError("ckpt_path", f"{last} is torn ({problem}) and no other checkpoint under {folder} is intact",
                      "pass --ckpt_path FILE, or move the torn file away to start from scratch", head="ckpt_path=last")


def _tokenizer_of(base_model: str, tokenizer: Any) -> str:
    """The data is tokenized with model.tokenizer when set, else with the base model's tokenizer."""
    return tokenizer or base_model


def main(args: Any = None) -> None:
    try:
        QPeftCLI(args=args)
    except SIGTERMException:
        # Lightning exits with 0 here, as if the run had finished; a job script must be able to tell
        sys.exit(128 + signal.SIGTERM)
