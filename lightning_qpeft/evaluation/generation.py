"""Generation metrics: generate for the evaluation prompts, score ROUGE-1/2/L and corpus BLEU against every
reference, and write the generations as JSON lines beside the logs.

Config keys (`generation_metrics.*`, a top-level section of the CLI config):
    test:             score at `test` (logs `test/rouge1`, `test/rouge2`, `test/rougeL`, `test/bleu`)
    validate:         score at `validate` (logs `val/...`)
    fit_every_n_val:  during `fit`, score every n-th validation (0: never; generation is slow)
    max_records:      generate for at most this many evaluation prompts (the first ones)
    batch_size:       prompts per generation batch (default: data.eval_batch_size)
    dirpath:          where the JSONL files go (default: the run's log folder)
    rouge_stemmer:    Porter-stem words before ROUGE (as rouge-score and most summarization papers do)
Decoding settings (greedy by default, max_new_tokens, sampling) are `model.generation`.

Scores are percentages, as papers report them. ROUGE is torchmetrics' `ROUGEScore` F-measure with
`accumulate="best"` (per prompt, the best-matching reference). BLEU is sacrebleu's corpus BLEU (13a
tokenization, n-grams clipped by their most frequent count in any reference, closest reference length), the
form E2E NLG reports, with all references of every prompt; prompts with fewer references are padded with
None, which sacrebleu skips.

Generation runs in this callback, not in the module: the test loader yields padded training-style batches
for `test/loss`, while generation needs left-padded prompts, one per distinct prompt
(`NLGDataModule.prompts`: E2E's 4,672 dev pairs are 547 prompts). Under several processes each rank
generates a contiguous shard; the rows are gathered so that every rank scores the whole set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import sacrebleu
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.functional.text import rouge_score

from lightning_qpeft.utils.atomic import atomic_file

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def score_generations(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      rouge_stemmer: bool = True) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (best reference) and corpus BLEU (all references), as percentages.

    Args:
        predictions: one generated text per prompt.
        references: the acceptable outputs of each prompt (at least one).
        rouge_stemmer: Porter-stem words before ROUGE.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"score_generations: {len(predictions)} predictions for {len(references)} reference sets")
    if any(len(r) == 0 for r in references):
        raise ValueError("score_generations: every prediction needs at least one reference")
    rouge = rouge_score(list(predictions), [list(r) for r in references], accumulate="best",
                        use_stemmer=rouge_stemmer, rouge_keys=ROUGE_KEYS)
    most = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(most)]
    bleu = sacrebleu.corpus_bleu(list(predictions), streams)
    scores = {k: 100 * float(rouge[f"{k}_fmeasure"]) for k in ROUGE_KEYS}
    scores["bleu"] = float(bleu.score)
    return scores


class GenerationMetrics(Callback):
    """Generate for the validation/test prompts and log ROUGE and BLEU; write (prompt, prediction,
    references) as JSON lines.

    Args:
        test: score at `test`.
        validate: score at `validate`.
        fit_every_n_val: during fit, score every n-th validation run (0: never).
        max_records: generate for at most this many prompts of the split.
        batch_size: prompts per generation batch (default: the data module's eval_batch_size).
        dirpath: folder of the JSONL files (default: the trainer's log_dir).
        rouge_stemmer: Porter-stem words before ROUGE.
    """

    def __init__(self, test: bool = True, validate: bool = True, fit_every_n_val: int = 0,
                 max_records: Optional[int] = None, batch_size: Optional[int] = None,
                 dirpath: Optional[str] = None, rouge_stemmer: bool = True) -> None:
        if fit_every_n_val < 0:
            raise ValueError(f"generation_metrics.fit_every_n_val: {fit_every_n_val}; use 0 (never) or more")
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
        from lightning_qpeft.data.collate import PromptCollator  # data imports stay out of evaluation's import

        prompts = dm.prompts(split)
        if self.max_records is not None:
            prompts = prompts.select(range(min(self.max_records, len(prompts))))
        if trainer.world_size > 1:
            prompts = prompts.shard(trainer.world_size, trainer.global_rank, contiguous=True)
        loader = torch.utils.data.DataLoader(prompts.with_format(None), batch_size=self.batch_size or dm.eval_batch_size,
                                             collate_fn=PromptCollator(dm.tokenizer.pad_token_id))
        rows: list[dict[str, Any]] = []
        for batch in loader:
            tokens = pl_module.generate(batch["input_ids"].to(pl_module.device),
                                        batch["attention_mask"].to(pl_module.device))
            for meta, text in zip(batch["meta"], dm.decode(tokens)):
                refs = meta.get("references") or [meta.get("output", "")]
                rows.append({"prompt": meta["prompt"], "prediction": text, "references": refs})
        rows = _gather(rows, trainer.world_size)
        if not rows:
            return
        scores = score_generations([r["prediction"] for r in rows], [r["references"] for r in rows],
                                   self.rouge_stemmer)
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


def _gather(rows: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Every rank's rows, in rank order (the shards are contiguous, so this is the split's order)."""
    if world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return rows
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, rows)
    return [row for part in parts for row in part]
