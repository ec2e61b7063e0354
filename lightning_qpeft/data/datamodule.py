"""`NLGDataModule`: records -> prompt template -> tokens with the prompt masked -> padded batches.

Config keys (`data.*`):
    tokenizer:        linked from `model.base_model` by the CLI (the base model's own tokenizer)
    task, path:       which records (`sources.py`); val_path / test_path / predict_path for other splits;
                      `random-tokens`: fixed-length random ids for speed measurements (`random_tokens.py`)
    template:         prompt template (`templates.py`); default: the task's
    train_on_source, source_max_len, target_max_len: see `collate.py`
    val_size:         records split off train for validation when no val_path/built-in validation
                      exists (a fraction < 1, or a count); the split is seeded by `seed`
    max_train_records: use only the first N training records (quick runs)
    batch_size, eval_batch_size, num_workers, seed
"""

from __future__ import annotations

from typing import Any, Optional, Union

import datasets
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_qpeft.data.collate import PadCollator, PromptCollator, tokenize_prompts, tokenize_records
from lightning_qpeft.data.sources import DataError, get_task, load_task_splits, read_json_records
from lightning_qpeft.data.templates import get_template
from lightning_qpeft.model.loading import load_tokenizer, resolve_base_model


class NLGDataModule(LightningDataModule):
    """Instruction / NLG data for causal-LM fine-tuning.

    Args:
        tokenizer: tokenizer folder or hub id (the CLI links it to model.base_model).
        task: task name (see `lightning_qpeft.data.sources.TASKS`), e.g. synthetic-e2e, or file.
        path: local file of training records (.json / .jsonl); replaces the task's built-in data.
        val_path: local file of validation records.
        test_path: local file of test records.
        predict_path: local file of records to generate for in `predict`.
        template: prompt template name (alpaca, plain, summarization, data_to_text, chat).
        train_on_source: also compute the loss on the prompt tokens.
        source_max_len: maximum prompt tokens (BOS + template).
        target_max_len: maximum response tokens (output + EOS); at least 1.
        val_size: validation records split off train when there is no validation file: fraction or count.
        max_train_records: use at most this many training records.
        batch_size: records per training micro-batch.
        eval_batch_size: records per validation/test/predict batch (default: batch_size).
        num_workers: DataLoader worker processes.
        seed: seed of the train/validation split and of the built-in task.
        trust_remote_code: passed to the tokenizer loader.
    """

    def __init__(
        self,
        tokenizer: str = "checkpoints/tiny-llama",
        task: str = "synthetic-e2e",
        path: Optional[str] = None,
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        predict_path: Optional[str] = None,
        template: Optional[str] = None,
        train_on_source: bool = False,
        source_max_len: int = 384,
        target_max_len: int = 128,
        val_size: Union[float, int] = 0.05,
        max_train_records: Optional[int] = None,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 42,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        spec = get_task(task)
        if spec.tokens is not None and path is not None:
            raise ValueError(f"data.path: task {task!r} makes its own records; unset data.path or use task: file")
        self.template = get_template(template or spec.template)
        if target_max_len < 1:
            raise ValueError(f"data.target_max_len: {target_max_len} leaves no target token; use at least 1")
        if source_max_len < 1:
            raise ValueError(f"data.source_max_len: {source_max_len}; use at least 1")
        if not (0 < val_size < 1 or (isinstance(val_size, int) and val_size >= 1)):
            raise ValueError(f"data.val_size: {val_size}; give a fraction in (0, 1) or a record count >= 1")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.task = task
        self.path, self.val_path, self.test_path, self.predict_path = path, val_path, test_path, predict_path
        self.train_on_source = train_on_source
        self.source_max_len, self.target_max_len = source_max_len, target_max_len
        self.val_size = val_size
        self.max_train_records = max_train_records
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.tokenizer: Any = None
        self.records: dict[str, Optional[datasets.Dataset]] = {}
        self.tokenized: dict[str, datasets.Dataset] = {}

    def prepare_data(self) -> None:
        # local rank 0 only, before setup: build the built-in model folder once, not once per rank
        resolve_base_model(self.tokenizer_name)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        if stage == "predict":
            if self.predict_path is None:
                raise DataError("data.predict_path: predict needs a file of records to generate for")
            self.records["predict"] = read_json_records(self.predict_path, "data.predict_path")
            return
        if self.records:
            return
        spec = get_task(self.task)
        if spec.tokens is not None:  # token-level task: records are token ids already (no template, no tokenizer)
            self.records = spec.tokens(len(self.tokenizer), self.source_max_len, self.target_max_len,
                                       self.train_on_source, self.seed)
            if self.max_train_records is not None:
                train = self.records["train"]
                self.records["train"] = train.select(range(min(self.max_train_records, len(train))))
            self.tokenized = dict(self.records)
            return
        splits = load_task_splits(self.task, self.path, self.val_path, self.test_path, self.seed)
        train = splits["train"]
        if self.max_train_records is not None:
            train = train.select(range(min(self.max_train_records, len(train))))
        if splits["validation"] is None:
            if len(train) < 2:
                raise DataError(f"data.path: {len(train)} record(s) cannot be split into train and validation")
            parts = train.train_test_split(test_size=self.val_size, seed=self.seed, shuffle=True)
            train, splits["validation"] = parts["train"], parts["test"]
        self.records = {**splits, "train": train}
        for split, ds in self.records.items():
            if ds is not None:
                self.tokenized[split] = self._tokenize(ds)

    def _tokenize(self, ds: datasets.Dataset) -> datasets.Dataset:
        return ds.map(
            tokenize_records,
            batched=True,
            remove_columns=ds.column_names,
            fn_kwargs=dict(
                tokenizer=self.tokenizer,
                template=self.template,
                source_max_len=self.source_max_len,
                target_max_len=self.target_max_len,
                train_on_source=self.train_on_source,
            ),
            desc="tokenize",
        )

    def prompts(self, split: str) -> datasets.Dataset:
        """Prompt-only tokenization of a split's records, keeping output/references for scoring."""
        ds = self.records[split]
        return ds.map(
            tokenize_prompts,
            batched=True,
            fn_kwargs=dict(tokenizer=self.tokenizer, template=self.template, source_max_len=self.source_max_len),
            desc="prompts",
        )

    # ------------------------------------------------------------------------------ loaders
    def _loader(self, ds: datasets.Dataset, shuffle: bool, batch_size: int, collate: Any) -> DataLoader:
        # StatefulDataLoader: Lightning saves its position (sampler state, batches yielded) in checkpoints,
        # so a resumed run continues with the very batches an unbroken run would have seen.
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return StatefulDataLoader(
            ds.with_format(None), batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
            num_workers=self.num_workers, generator=generator, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.tokenized["train"], True, self.batch_size, PadCollator(self.tokenizer.pad_token_id))

    def val_dataloader(self) -> DataLoader:
        return self._loader(
            self.tokenized["validation"], False, self.eval_batch_size, PadCollator(self.tokenizer.pad_token_id)
        )

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.tokenized:
            raise DataError("data.test_path: this task has no test split; set data.test_path")
        return self._loader(self.tokenized["test"], False, self.eval_batch_size, PadCollator(self.tokenizer.pad_token_id))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(
            self.prompts("predict"), False, self.eval_batch_size, PromptCollator(self.tokenizer.pad_token_id)
        )

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Generated ids -> text, stopping at EOS."""
        return [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
