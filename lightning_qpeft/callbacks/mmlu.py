"""MMLU during training and on its own: scores the model on A-D logits as QLoRA does, logs, writes a report.

Config keys (`mmlu.*`, a top-level section of the CLI config; off unless `mmlu.enabled: true`):
    enabled:              run the evaluation
    source, path, split, shots, max_prompt_tokens, hub_name, synthetic_questions: which questions and how the
                          prompts are built (`lightning_qpeft.evaluation.mmlu_sources`)
    max_samples, sample_seed: evaluate a subset (quick runs)
    every_n_validations:  during fit, evaluate after every N-th validation run
    at_fit_start / at_fit_end: also evaluate before the first step (a baseline) / when training ends
    batch_tokens, batch_size, padding_side, max_length, letter_tokens: how it is scored
                          (`lightning_qpeft.evaluation.mmlu_scoring`)
    report_path:          the JSON report (default `<log_dir>/mmlu_<split>.json`; a QLoRA file's:
                          `<log_dir>/mmlu_<file stem>.json`, e.g. mmlu_five_shot_mmlu_val.json)

When it runs: in `fit`, at the end of every N-th validation (not the sanity check) and when training ends
(unless that step was just evaluated), writing the report of the last evaluation; in `validate` / `test`,
once, at the end of the loop, and it then writes the report. `validate` still runs the data module's validation loss: `configs/mmlu.yaml` points the
data at the built-in `synthetic-mc` task and `trainer.limit_val_batches: 1`, so that costs one batch and
needs no data file. With `limit_val_batches: 0` Lightning skips the loop and every hook in it, so that is
refused.

Logged: `mmlu/accuracy`, `mmlu/accuracy_macro`, `mmlu/loss`, `mmlu/lm_loss` and `mmlu/category/*` through
`LightningModule.log` (they reach `callback_metrics`, so ModelCheckpoint can monitor `mmlu/accuracy`, and the
printed results of validate/test); `mmlu/<subject>` straight to the logger (57 lines would drown the table).
The report (`MMLUResults.report`) holds overall, categories, subjects and every question with its k,
answer, prediction and letter probabilities, plus the settings, and is written atomically by rank zero.

Several processes (DDP): every rank scores every world_size-th batch of the length-sorted plan and the ranks'
scores are summed (`strategy.reduce`), so each question is scored once and every rank gets every result.
Sharded strategies whose forward is collective (FSDP, ModelParallel, DeepSpeed) would deadlock on unequal
shares and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.evaluation.mmlu import MMLUEvaluator, MMLUResults
from lightning_qpeft.evaluation.mmlu_scoring import LETTER_TOKEN_MODES, PADDING_SIDES
from lightning_qpeft.evaluation.mmlu_sources import SOURCES, SPLITS, load_items, select
from lightning_qpeft.utils.atomic import atomic_file

REFUSED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")
SUMMARY_METRICS = ("mmlu/accuracy", "mmlu/accuracy_macro", "mmlu/loss", "mmlu/lm_loss")


class MMLUEvaluation(Callback):
    """Few-shot multiple-choice evaluation on the A/B/C/D logits (QLoRA's MMLU protocol).

    Args:
        enabled: run the evaluation (off by default: the section is always present in the CLI).
        source: synthetic (built-in generated questions), json (QLoRA's data/mmlu files), csv (MMLU's
            dev/val/test folders), hub (the cais/mmlu dataset; needs the hub).
        path: the JSON file (json) or the folder holding dev/, val/, test/ (csv); a missing file named as one of
            QLoRA's (five_shot_mmlu_val.json ...) is built from the CSVs beside it (data/mmlu).
        split: val or test (csv, hub, synthetic; a QLoRA JSON file is one split already and ignores it).
        shots: solved dev examples per prompt (csv, hub, synthetic); QLoRA's five-shot protocol is 5.
        max_prompt_tokens: k is lowered per question until the prompt has at most this many tokens
            (special tokens not counted; Hendrycks' and QLoRA's 2048).
        max_length: most tokens a scored prompt keeps, BOS included (QLoRA's mmlu_source_max_len).
        max_samples: evaluate only this many questions (QLoRA's max_mmlu_samples: the first N).
        sample_seed: with max_samples, draw the questions at random with this seed instead of taking the first.
        every_n_validations: during fit, evaluate after every N-th validation run.
        at_fit_start: also evaluate before training starts (a baseline at step 0).
        at_fit_end: also evaluate when training ends.
        batch_tokens: token budget of a scoring batch (rows x padded length).
        batch_size: most prompts in a scoring batch.
        padding_side: right (QLoRA) or left; both give the same scores.
        letter_tokens: qlora (tokenizer("A")[0], QLoRA's) or continuation (the token after "Answer:").
        report_path: the JSON report; default `<log_dir>/mmlu_<split>.json` (json: `mmlu_<file stem>.json`).
        hub_name: hub dataset laid out as cais/mmlu (source hub).
        synthetic_questions: questions per subject of the synthetic set (source synthetic).
        name: the metrics' prefix (`mmlu/accuracy`); a second evaluation in `trainer.callbacks` (say five-shot
            beside zero-shot) takes another (`mmlu5/accuracy`) so that neither overwrites the other.
    """

    @property
    def metric_directions(self) -> dict[str, str]:
        """Which way each logged metric is better (metrics_file.py): accuracies up, losses down."""
        return {f"{self.name}/*": "higher", f"{self.name}/loss": "lower", f"{self.name}/lm_loss": "lower"}

    def __init__(
        self,
        enabled: bool = False,
        source: str = "synthetic",
        path: Optional[str] = None,
        split: str = "val",
        shots: int = 5,
        max_prompt_tokens: int = 2048,
        max_length: int = 2048,
        max_samples: Optional[int] = None,
        sample_seed: Optional[int] = None,
        every_n_validations: int = 1,
        at_fit_start: bool = False,
        at_fit_end: bool = True,
        batch_tokens: int = 16384,
        batch_size: int = 64,
        padding_side: str = "right",
        letter_tokens: str = "qlora",
        report_path: Optional[str] = None,
        hub_name: str = "cais/mmlu",
        synthetic_questions: int = 40,
        name: str = "mmlu",
    ) -> None:
        # refuse bad values now, before any model or data is loaded
        checks = [  # (fine, key, reason, way out)
            (source in SOURCES, "mmlu.source", repr(source), f"choose one of {', '.join(SOURCES)}"),
            (split in SPLITS, "mmlu.split", repr(split), "choose val or test"),
            (padding_side in PADDING_SIDES, "mmlu.padding_side", repr(padding_side), "choose right or left"),
            (letter_tokens in LETTER_TOKEN_MODES, "mmlu.letter_tokens", repr(letter_tokens),
             "choose qlora or continuation"),
            (shots >= 0, "mmlu.shots", str(shots), "use 0 or more"),
            (bool(name) and "/" not in name, "mmlu.name", repr(name), "give a non-empty prefix without '/'"),
            (every_n_validations >= 1, "mmlu.every_n_validations", str(every_n_validations), "use 1 or more"),
            (max_samples is None or max_samples >= 1, "mmlu.max_samples", str(max_samples), "use 1 or more"),
            (not (enabled and source in ("json", "csv") and path is None),
             "mmlu.path", f"mmlu.source {source} reads a file or folder", "set mmlu.path"),
        ]
        for ok, key, reason, way_out in checks:
            if not ok:
                raise ConfigError(key, reason, way_out)
        if path is not None and source in ("synthetic", "hub"):  # its text has no "key: " head, so a ValueError
            raise ValueError(f"mmlu.path is set ({path}) but mmlu.source {source} reads no file; set mmlu.path null, "
                             "or mmlu.source json (a QLoRA file) or csv (a folder)")
        self.enabled = enabled
        self.source, self.path, self.split, self.shots = source, path, split, shots
        self.max_prompt_tokens, self.max_length = max_prompt_tokens, max_length
        self.max_samples, self.sample_seed = max_samples, sample_seed
        self.every_n_validations = every_n_validations
        self.at_fit_start, self.at_fit_end = at_fit_start, at_fit_end
        self.batch_tokens, self.batch_size = batch_tokens, batch_size
        self.padding_side, self.letter_tokens = padding_side, letter_tokens
        self.report_path = report_path
        self.hub_name, self.synthetic_questions = hub_name, synthetic_questions
        self.name = name
        self.evaluator: Optional[MMLUEvaluator] = None
        self.validations = 0  # validation runs seen during fit (kept in checkpoints)
        self.last_step: Optional[int] = None
        self.last_results: Optional[MMLUResults] = None
        self.last_report: Optional[Path] = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        if type(trainer.strategy).__name__ in REFUSED_STRATEGIES:
            raise ConfigError(
                "mmlu.enabled", "the MMLU evaluation shards questions unevenly over ranks, which would deadlock "
                f"{type(trainer.strategy).__name__}'s collective forward", "use trainer.strategy ddp or set "
                "mmlu.enabled false"
            )
        limit = trainer.limit_test_batches if stage == "test" else trainer.limit_val_batches
        if stage in ("validate", "test") and limit == 0:
            key = "limit_test_batches" if stage == "test" else "limit_val_batches"
            raise ConfigError(
                f"trainer.{key}", f"0 makes Lightning skip the {stage} loop and the MMLU evaluation with it",
                f"set trainer.{key}: 1 (configs/mmlu.yaml does)"
            )
        if self.evaluator is None:
            tokenizer = self._tokenizer(trainer, pl_module)
            items = load_items(self.source, tokenizer, self.path, self.split, self.shots, self.max_prompt_tokens,
                               self.hub_name, self.synthetic_questions)
            items = select(items, self.max_samples, self.sample_seed)
            self.evaluator = MMLUEvaluator(items, tokenizer, self.letter_tokens, self.max_length, self.batch_tokens,
                                           self.batch_size, self.padding_side)
            rank_zero_info(f"mmlu: {len(items)} questions ({self.describe()}), {len(self.evaluator.batches)} batches")

    @staticmethod
    def _tokenizer(trainer: Trainer, pl_module: LightningModule) -> Any:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:  # no data module (or not set up): the base model's own
            from lightning_qpeft.base_models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(pl_module.base_model, getattr(pl_module, "trust_remote_code", False))
        return tokenizer

    def describe(self) -> str:
        if self.source == "json":
            return f"json {self.path}, prompts as built in the file"
        where = {"csv": f" {self.path}", "hub": f" {self.hub_name}"}.get(self.source, "")
        return f"{self.source}{where}, {self.split}, {self.shots}-shot"

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and self.at_fit_start:
            self._log(trainer, pl_module, self.run(trainer, pl_module), through_module=False)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        if trainer.state.fn.value == "fit":
            self.validations += 1
            if self.validations % self.every_n_validations:
                return
        results = self.run(trainer, pl_module)
        self._log(trainer, pl_module, results, through_module=True)
        if trainer.state.fn.value != "fit":
            self.write_report(trainer, pl_module, results)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled:
            results = self.run(trainer, pl_module)
            self._log(trainer, pl_module, results, through_module=True)
            self.write_report(trainer, pl_module, results)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        if self.at_fit_end and (self.last_step != trainer.global_step or self.last_results is None):
            self._log(trainer, pl_module, self.run(trainer, pl_module), through_module=False)
        if self.last_results is not None:  # the report of the last evaluation
            self.write_report(trainer, pl_module, self.last_results)

    @property
    def state_key(self) -> str:
        # two evaluations in one run (zero- and five-shot) keep their states apart in checkpoints
        return super().state_key if self.name == "mmlu" else self._generate_state_key(name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict.get("validations", 0)

    # ------------------------------------------------------------------------------------------ work
    def run(self, trainer: Trainer, pl_module: LightningModule) -> MMLUResults:
        """Score the model on every question (this rank's share, summed over ranks)."""
        if self.evaluator is None:
            self.setup(trainer, pl_module, "fit")
        strategy = trainer.strategy
        results = self.evaluator.evaluate(
            pl_module.model,
            pl_module.device,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            all_reduce_sum=lambda t: strategy.reduce(t, reduce_op="sum"),
            forward_context=trainer.precision_plugin.forward_context,
        )
        self.last_step, self.last_results = trainer.global_step, results
        m = results.metrics()
        rank_zero_info(
            f"mmlu step {trainer.global_step}: accuracy {m['mmlu/accuracy']:.4f} (macro {m['mmlu/accuracy_macro']:.4f},"
            f" loss {m['mmlu/loss']:.4f}) on {len(results.items)} questions in {results.seconds:.1f} s"
        )
        return results

    def _log(self, trainer: Trainer, pl_module: LightningModule, results: MMLUResults, through_module: bool) -> None:
        metrics = results.metrics()
        main = {k: v for k, v in metrics.items() if k in SUMMARY_METRICS or k.startswith("mmlu/category/")}
        rest = {k: v for k, v in metrics.items() if k not in main}  # mmlu/<subject>
        if self.name != "mmlu":
            main, rest, metrics = ({f"{self.name}/{k[len('mmlu/'):]}": v for k, v in d.items()}
                                   for d in (main, rest, metrics))
        if through_module:
            for name, value in main.items():
                pl_module.log(name, value, prog_bar=name.endswith("/accuracy"), sync_dist=False)  # equal on all ranks
        else:
            rest = metrics
        for logger in trainer.loggers:
            logger.log_metrics(rest, step=self._logging_step(trainer))

    @staticmethod
    def _logging_step(trainer: Trainer) -> int:
        # the step Lightning logs the module's metrics at in fit (a validation after step N is logged at N - 1,
        # as val/loss is), so mmlu/<subject> lines up with mmlu/accuracy
        if trainer.state.fn.value == "fit":
            return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        return trainer.global_step

    def resolve_report_path(self, trainer: Trainer) -> Path:
        if self.report_path is not None:
            return Path(self.report_path)
        # a QLoRA file is one split already: the report is named after it (mmlu_five_shot_mmlu_val.json)
        name = Path(self.path).stem if self.source == "json" else self.split
        return Path(trainer.log_dir or trainer.default_root_dir) / f"{self.name}_{name}.json"

    def write_report(self, trainer: Trainer, pl_module: LightningModule, results: MMLUResults) -> Path:
        path = self.resolve_report_path(trainer)
        if trainer.is_global_zero:
            report = results.report(
                stage=trainer.state.fn.value,
                global_step=trainer.global_step,
                base_model=getattr(pl_module, "base_model", None),
                adapter_path=getattr(pl_module, "adapter_path", None),
                adapter=getattr(pl_module, "method", None),
                quantization=getattr(pl_module, "quantization", None),
                source=self.source,
                path=self.path,
                split=None if self.source == "json" else self.split,
                shots=None if self.source == "json" else self.shots,
                max_prompt_tokens=self.max_prompt_tokens,
                max_samples=self.max_samples,
                world_size=trainer.world_size,
            )
            with atomic_file(path, "w") as f:
                json.dump(report, f, indent=1, ensure_ascii=False)
            rank_zero_info(f"mmlu report written to {path}")
        self.last_report = path
        return path
