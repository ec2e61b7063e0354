"""Generate for the evaluation prompts, score them (ROUGE, BLEU: evaluation/generation.py), log, and write the
generations as JSON lines beside the logs.

Config keys (`generation_metrics.*`, a top-level section of the CLI config):
    test:             score at `test` (logs `test/rouge1`, `test/rouge2`, `test/rougeL`, `test/bleu`,
                      `test/stopped_fraction`, `test/generation_tokens_per_s`, `test/generation_s`)
    validate:         score at `validate` (logs `val/...`)
    fit_every_n_val:  during `fit`, score every n-th validation (0: never; generation is slow)
    max_records:      generate for at most this many evaluation prompts (the first ones)
    batch_size:       prompts per generation batch (default: data.eval_batch_size)
    dirpath:          where the JSONL files go (default: the run's log folder)
    rouge_stemmer:    Porter-stem words before ROUGE (as rouge-score and most summarization papers do)
Decoding settings (greedy by default, max_new_tokens, sampling) are `model.generation`.

`{stage}/stopped_fraction` is the share of answers that ended with a stop token (EOS or the chat template's
end-of-turn) before `max_new_tokens`: a fine-tuned model that never learned to stop scores near 0.
`{stage}/generation_tokens_per_s` counts each answer's tokens up to and including its stop token (what a user
gets, not the padding of rows that ended early) over the wall time of the decoding calls (`generation_s`,
the device synchronised at both ends): this rank's, as decoding is per rank.

Generation runs in this callback, not in the module: the test loader yields padded training-style batches
for `test/loss`, while generation needs left-padded prompts, one per distinct prompt
(`NLGDataModule.prompts`: E2E's 4,672 dev pairs are 547 prompts). Prompts are batched by length (longest
first; `plan_batches`), so a batch pads to prompts of about its own length; the rows are written back in the
split's order. Under several processes each rank generates a contiguous shard; the rows are gathered so that
every rank scores the whole set.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.core.tokens import cut_at_stop
from lightning_qpeft.data.collate import PromptCollator
from lightning_qpeft.evaluation.generation import score_generations
from lightning_qpeft.evaluation.mmlu_scoring import plan_batches
from lightning_qpeft.utils.atomic import atomic_file


class GenerationMetrics(Callback):
    """Generate for the validation/test prompts and log ROUGE, BLEU and the stopped fraction; write (prompt,
    prediction, references, stopped) as JSON lines.

    Args:
        test: score at `test`.
        validate: score at `validate`.
        fit_every_n_val: during fit, score every n-th validation run (0: never).
        max_records: generate for at most this many prompts of the split.
        batch_size: prompts per generation batch (default: the data module's eval_batch_size).
        dirpath: folder of the JSONL files (default: the trainer's log_dir).
        rouge_stemmer: Porter-stem words before ROUGE.
    """

    # which way each score is better, for every stage (metrics_file.py)
    metric_directions = {"*/rouge1": "higher", "*/rouge2": "higher", "*/rougeL": "higher", "*/bleu": "higher",
                         "*/generation_tokens_per_s": "higher", "*/generation_s": "lower"}

    def __init__(self, test: bool = True, validate: bool = True, fit_every_n_val: int = 0,
                 max_records: Optional[int] = None, batch_size: Optional[int] = None,
                 dirpath: Optional[str] = None, rouge_stemmer: bool = True) -> None:
        if fit_every_n_val < 0:
            raise ConfigError("generation_metrics.fit_every_n_val", str(fit_every_n_val), "use 0 (never) or more")
        self.test, self.validate, self.fit_every_n_val = test, validate, fit_every_n_val
        self.max_records, self.batch_size, self.dirpath = max_records, batch_size, dirpath
        self.rouge_stemmer = rouge_stemmer
        self.last_scores: dict[str, float] = {}
        self.last_path: Optional[Path] = None
        self._fit_validations = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_validations = 0

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self._fit_validations += 1
            if not self.fit_every_n_val or self._fit_validations % self.fit_every_n_val:
                return
            self.evaluate(trainer, pl_module, "validation", "val", f"val_generations_step{trainer.global_step}")
        elif self.validate:
            self.evaluate(trainer, pl_module, "validation", "val", "val_generations")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.test:
            self.evaluate(trainer, pl_module, "test", "test", "test_generations")

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule, split: str, stage: str, name: str) -> None:
        """Generate for the split's prompts (this rank's shard), gather, score, log `{stage}/...`, write JSONL."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "prompts") or split not in getattr(dm, "records", {}):
            rank_zero_warn(f"generation_metrics: no {split} prompts to generate for (needs NLGDataModule)")
            return
        prompts = dm.prompts(split)
        if self.max_records is not None:
            prompts = prompts.select(range(min(self.max_records, len(prompts))))
        if trainer.world_size > 1:
            prompts = prompts.shard(trainer.world_size, trainer.global_rank, contiguous=True)
        records = list(prompts.with_format(None))
        rows, timing = self._generate(records, dm, pl_module)
        rows = _gather(rows, trainer.world_size)
        if not rows:
            return
        scores = score_generations([r["prediction"] for r in rows], [r["references"] for r in rows],
                                   self.rouge_stemmer)
        scores["stopped_fraction"] = sum(r["stopped"] for r in rows) / len(rows)
        scores.update(timing)
        for key, value in scores.items():
            pl_module.log(f"{stage}/{key}", value, sync_dist=False)  # every rank scored the gathered set
        self.last_scores = scores
        path = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir) / f"{name}.jsonl"
        if trainer.is_global_zero:
            with atomic_file(path, "w") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.last_path = path
        rank_zero_info(f"{stage}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
                       + f" over {len(rows)} prompts; generations in {path}")

    def _generate(self, records: list[dict[str, Any]], dm: Any,
                  pl_module: LightningModule) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """One row per record, in the records' order, and the decoding's speed; batches planned by prompt
        length."""
        collate = PromptCollator(dm.tokenizer.pad_token_id)
        batch_size = self.batch_size or dm.eval_batch_size
        rows: list[dict[str, Any]] = [{}] * len(records)
        seconds, answered = 0.0, 0
        for plan in plan_batches([len(r["input_ids"]) for r in records], batch_tokens=2**62, batch_size=batch_size):
            batch = collate([records[i] for i in plan])
            ids, mask = batch["input_ids"].to(pl_module.device), batch["attention_mask"].to(pl_module.device)
            _synchronize(pl_module.device)
            start = time.perf_counter()
            tokens = pl_module.generate(ids, mask, dm.stop_ids, dm.tokenizer.pad_token_id)
            _synchronize(pl_module.device)
            seconds += time.perf_counter() - start
            cut, ended = cut_at_stop(tokens, dm.stop_ids)
            answered += sum(len(row) for row in cut) + sum(ended)  # the stop token is a generated token too
            texts, stopped = dm.decode(tokens)
            for i, meta, text, done in zip(plan, batch["meta"], texts, stopped):
                refs = meta.get("references") or [meta.get("output", "")]
                rows[i] = {"prompt": meta["prompt"], "prediction": text, "references": refs, "stopped": done}
        return rows, {"generation_tokens_per_s": answered / max(seconds, 1e-9), "generation_s": seconds}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gather(rows: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Every rank's rows, in rank order (the shards are contiguous, so this is the split's order)."""
    if world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return rows
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, rows)
    return [row for part in parts for row in part]
