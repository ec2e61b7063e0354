"""The command line: LightningCLI over `QPeftModule` and `NLGDataModule`.

    python -m lightning_qpeft {fit,validate,test,predict} --config FILE [--key value ...]

Besides `model.*`, `data.*` and `trainer.*`, the config has top-level sections for the callbacks every run
gets: `adapter_export` (peft export at the end of fit), `prediction_writer` (JSONL output of predict) and `mmlu`
(MMLU evaluation during fit and in validate/test; off unless `mmlu.enabled: true`).
`model.base_model` is linked to `data.tokenizer`: the data is always tokenized with the base model's tokenizer.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_qpeft.callbacks import AdapterExport, JsonlPredictionWriter, MMLUEvaluation
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.model.module import QPeftModule

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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.base_model", "data.tokenizer")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.add_lightning_class_args(AdapterExport, "adapter_export")
        parser.add_lightning_class_args(JsonlPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(MMLUEvaluation, "mmlu")


def main(args: Any = None) -> None:
    QPeftCLI(args=args)
