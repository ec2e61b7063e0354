"""`NLGDataModule`: records -> prompt template -> tokens with the prompt masked -> padded or packed batches.

Config keys (`data.*`):
    tokenizer:        linked from `model.base_model` by the CLI (the base model's own tokenizer)
    task, path, val_path, test_path, hub_id, hub_config, hub_kwargs, *_field: which records (`sources.py`)
    predict_path:     records to generate for in `predict` (their `output` is optional)
    template:         prompt template (`tasks/templates.py`); default: the task's (or what its file layout implies)
    train_on, system_prompt, chat_template: conversations and `template: chat` (`chat_tokens.py`)
    train_on_source, source_max_len, target_max_len: see `collate.py`
    packing:          train on padding-free packed rows (`collate.PackCollator`); validation stays padded
    pad_to_multiple_of: round padded batches' length up to a multiple of this (fewer distinct shapes)
    group_by_length, max_tokens: training batch composition (`samplers.py`)
    val_size:         records split off train for validation when no validation split exists (a fraction
                      < 1, or a count); the split is seeded by `seed`
    max_train_records: use only the first N training records (quick runs)
    batch_size, eval_batch_size, num_workers, seed
    resume_changed_data: resume from a checkpoint trained on other data or batches (`resume.py`; refused unless set)

Records whose target is cut to nothing the loss can see (zero supervised tokens) are dropped with a warning
naming file and row; records cut by the length limits are counted. Both, with records, tokens, supervised
tokens and the padding fraction of the first epoch's batches, are logged once per fit as `data/*`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import datasets
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_qpeft.base_models.folders import resolve_base_model
from lightning_qpeft.base_models.tokenizer import TOKENIZER_KEY, load_tokenizer
from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.core.tokens import cut_at_stop, stop_token_ids
from lightning_qpeft.data.chat_tokens import ChatOptions, conversation_prompts, prepare_chat, tokenize_conversations
from lightning_qpeft.data.collate import (PackCollator, PadCollator, PromptCollator, padded_length, tokenize_prompts,
                                         tokenize_records)
from lightning_qpeft.data.resume import FreshStartLoader, check_resume, data_record
from lightning_qpeft.data.samplers import RecordBatchSampler
from lightning_qpeft.data.sources import DataError, TaskSource, get_task
from lightning_qpeft.tasks.templates import get_template


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """One column as a numpy array, read in one Arrow slice (iterating a `Column` formats row by row)."""
    return np.asarray(ds.select_columns([name]).with_format("numpy")[:][name])


STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}


class NLGDataModule(LightningDataModule):
    """Instruction / NLG data for causal-LM fine-tuning.

    Args:
        tokenizer: tokenizer folder or hub id (the CLI links it to model.base_model).
        task: task name (see `lightning_qpeft.data.sources.TASKS`), e.g. synthetic-e2e, alpaca, samsum, e2e, file.
        path: local file of training records (.json, .jsonl, .csv, .tsv, .parquet, .txt); replaces the task's
            built-in or hub data.
        val_path: local file of validation records.
        test_path: local file of test records.
        predict_path: local file of records to generate for in `predict`.
        hub_id: `datasets.load_dataset` path used when no `path` is given (default: the task's hub id).
        hub_config: the hub dataset's config name.
        hub_kwargs: more `datasets.load_dataset` arguments (data_files, revision, ...).
        instruction_field: source column of the canonical `instruction`.
        prompt_field: source column of the canonical `input` (the text the template puts in the prompt).
        response_field: source column of the canonical `output` (the target).
        references_field: source column of the references (a list of strings) for generation metrics.
        template: prompt template name (alpaca, plain, summarization, data_to_text, chat).
        train_on: which assistant turns of a conversation the loss covers: all, or the last.
        system_prompt: system turn of every conversation without one (None: the chat template's default).
        chat_template: None (the tokenizer's own), chatml (the built-in default), a Jinja file or Jinja text.
        train_on_source: also compute the loss on the prompt tokens.
        source_max_len: maximum prompt tokens (BOS + template).
        target_max_len: maximum response tokens (output + EOS); at least 1.
        val_size: validation records split off train when there is no validation file: a fraction in (0, 1)
            (a float, 0.05) or a record count (an integer, 5). `5.0` is a float >= 1 and refused: write `5`.
        max_train_records: use at most this many training records.
        batch_size: records per training micro-batch.
        eval_batch_size: records per validation/test/predict batch (default: batch_size).
        packing: flatten each training micro-batch into one padding-free row (position ids restart per record).
        pad_to_multiple_of: round the length of padded batches up to a multiple of this (e.g. 64), so that
            torch.compile, cuBLAS and Triton see a few shapes rather than one per longest record. Not with
            packing (the run plan refuses the pair: `model/rules.py`).
        group_by_length: put records of similar length into the same training micro-batch.
        max_tokens: token budget of a training micro-batch (instead of batch_size records).
        num_workers: DataLoader worker processes.
        seed: seed of the train/validation split, the training order and the built-in task.
        trust_remote_code: passed to the tokenizer loader.
        resume_changed_data: allow `--ckpt_path` to resume on other training data or batching than the checkpoint
            was trained on (its record: `resume.data_record`); the loader then starts the epoch's plan of this
            data from its first batch. Off: such a resume is refused, saying what differs.
    """

    def __init__(
        self,
        tokenizer: str = "checkpoints/tiny-llama",
        task: str = "synthetic-e2e",
        path: Optional[str] = None,
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        predict_path: Optional[str] = None,
        hub_id: Optional[str] = None,
        hub_config: Optional[str] = None,
        hub_kwargs: Optional[dict[str, Any]] = None,
        instruction_field: Optional[str] = None,
        prompt_field: Optional[str] = None,
        response_field: Optional[str] = None,
        references_field: Optional[str] = None,
        template: Optional[str] = None,
        train_on: str = "all",
        system_prompt: Optional[str] = None,
        chat_template: Optional[str] = None,
        train_on_source: bool = False,
        source_max_len: int = 384,
        target_max_len: int = 128,
        val_size: Union[int, float] = 0.05,
        max_train_records: Optional[int] = None,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        packing: bool = False,
        pad_to_multiple_of: Optional[int] = None,
        group_by_length: bool = False,
        max_tokens: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 42,
        trust_remote_code: bool = False,
        resume_changed_data: bool = False,
    ) -> None:
        super().__init__()
        if get_task(task).tokens is not None and path is not None:
            raise ConfigError("data.path", f"task {task!r} makes its own records", "unset data.path or use task: file")
        if template is not None:
            get_template(template)
        if target_max_len < 1:
            raise ConfigError("data.target_max_len", f"{target_max_len} leaves no target token", "use at least 1")
        if source_max_len < 1:
            raise ConfigError("data.source_max_len", str(source_max_len), "use at least 1")
        if not (isinstance(val_size, float) and 0 < val_size < 1 or isinstance(val_size, int) and val_size >= 1):
            raise ConfigError("data.val_size", repr(val_size), "give a fraction in (0, 1) (a float, e.g. 0.05) or a "
                              "record count >= 1 (an integer, e.g. 5)")
        if max_train_records is not None and max_train_records < 1:
            raise ConfigError("data.max_train_records", str(max_train_records),
                              "give at least 1, or leave it unset for all records")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError("data.pad_to_multiple_of", str(pad_to_multiple_of), "give at least 1, or leave it unset")
        if max_tokens is not None and max_tokens < source_max_len + target_max_len:
            raise ConfigError(
                "data.max_tokens", f"{max_tokens} is below the longest record (data.source_max_len + "
                f"data.target_max_len = {source_max_len + target_max_len})", "raise it or lower those limits"
            )
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.task = task
        self.path, self.val_path, self.test_path, self.predict_path = path, val_path, test_path, predict_path
        fields = {"instruction": instruction_field, "input": prompt_field, "output": response_field,
                  "references": references_field}
        self.source = TaskSource(task, {"train": path, "validation": val_path, "test": test_path}, hub_id,
                                 hub_config, hub_kwargs, {k: v for k, v in fields.items() if v}, seed)
        self.template_name = template
        self.template: Any = None
        self.conversation = ChatOptions(system_prompt, chat_template, train_on)
        self.chat = False  # records render through the chat template (conversations, or template: chat)
        self.train_on_source = train_on_source
        self.source_max_len, self.target_max_len = source_max_len, target_max_len
        self.val_size = val_size
        self.max_train_records = max_train_records
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.packing, self.group_by_length, self.max_tokens = packing, group_by_length, max_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.resume_changed_data = resume_changed_data
        self.validation_split_off_train = False
        self._fresh_start = False  # set by load_state_dict: the loader ignores the checkpoint's position
        self._record: Optional[dict[str, Any]] = None  # data_record, once per fit
        self._stop_ids: Optional[tuple[Any, list[int]]] = None  # (chat template, stop_token_ids of it)
        self.tokenizer: Any = None
        self.records: dict[str, datasets.Dataset] = {}
        self.tokenized: dict[str, datasets.Dataset] = {}
        self.dropped: dict[str, int] = {}
        self._stats_logged = False

    def prepare_data(self) -> None:
        # local rank 0 only, before setup: build the built-in model folder once, not once per rank
        resolve_base_model(self.tokenizer_name, TOKENIZER_KEY, need_config=False)

    # ------------------------------------------------------------------------------ records
    def setup(self, stage: Optional[str] = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        if stage == "fit":
            self._stats_logged = False
            self._record = None
        if stage == "predict":
            if self.predict_path is None:
                raise DataError("data.predict_path: predict needs a file of records to generate for")
            self.records["predict"] = self.source.read(self.predict_path, "data.predict_path", need_output=False)
            self._resolve_template()
            return
        for split in STAGE_SPLITS.get(stage or "fit", ("train", "validation", "test")):
            self._load(split)

    def _load(self, split: str) -> None:
        spec = get_task(self.task)
        if spec.tokens is not None:  # token-level task: records are token ids already (no template, no tokenizer)
            if not self.tokenized:
                self.tokenized = spec.tokens(len(self.tokenizer), self.source_max_len, self.target_max_len,
                                             self.train_on_source, self.seed)
                if self.max_train_records is not None:
                    train = self.tokenized["train"]
                    self.tokenized["train"] = train.select(range(min(self.max_train_records, len(train))))
                self.records = dict(self.tokenized)
            self._resolve_template()
            return
        if split not in self.records:
            ds = None if split == "train" else self.source.load(split)
            if ds is not None:
                self.records[split] = ds
            elif split != "test":  # train, and validation split off it when no source has one
                self._load_train_and_validation()
        self._resolve_template()
        if "train" in self.records and "train" not in self.tokenized:
            self._check_targets(self.records["train"])
        for name, ds in self.records.items():
            if name not in self.tokenized and name != "predict":
                self.tokenized[name] = self._tokenize(ds, name)

    def _load_train_and_validation(self) -> None:
        train = self.source.load("train")
        if self.max_train_records is not None:
            train = train.select(range(min(self.max_train_records, len(train))))
        validation = self.records["validation"] if "validation" in self.records else self.source.load("validation")
        if validation is None:
            if len(train) < 2:
                raise DataError(f"data.path: {len(train)} record(s) cannot be split into train and validation")
            n_val = self.val_size if isinstance(self.val_size, int) else math.ceil(self.val_size * len(train))
            if n_val >= len(train):
                raise DataError(f"data.val_size: {self.val_size!r} leaves no training record of the "
                                f"{len(train)}; give a smaller count or fraction, or a validation file (data.val_path)")
            parts = train.train_test_split(test_size=self.val_size, seed=self.seed, shuffle=True)
            train, validation = parts["train"], parts["test"]
            self.validation_split_off_train = True
            self.source.origins["validation"] = self.source.origins.get("train", "train")
        self.records.update(train=train, validation=validation)

    def _check_targets(self, train: datasets.Dataset) -> None:
        """Refuse training records whose outputs are all empty: the run would learn only to stop (EOS)."""
        batches = train.select_columns(["output"]).iter(batch_size=4096)  # stops at the first non-empty batch
        if len(train) and not any(o.strip() for batch in batches for o in batch["output"]):
            origin = self.source.origins.get("train", "train")
            raise DataError(f"{origin}: every training record's output is empty, so the run would learn only to "
                            "stop; set data.response_field to the column of the targets")

    def _resolve_template(self) -> None:
        if self.template is None:
            self.template = get_template(self.template_name or self.source.template or get_task(self.task).template)
            self.chat = prepare_chat(self.tokenizer, self.template, self.records, self.conversation, self.template_name)

    def _tokenize(self, ds: datasets.Dataset, split: str) -> datasets.Dataset:
        if self.chat:  # one budget for a conversation; cut at turn boundaries (chat_tokens.py)
            function, kwargs = tokenize_conversations, dict(
                options=self.conversation, max_len=self.source_max_len + self.target_max_len,
                origin=self.source.origins.get(split, split))
        else:
            function, kwargs = tokenize_records, dict(
                template=self.template, source_max_len=self.source_max_len, target_max_len=self.target_max_len)
        tokenized = ds.map(
            function,
            batched=True,
            remove_columns=ds.column_names,
            fn_kwargs=dict(tokenizer=self.tokenizer, train_on_source=self.train_on_source, **kwargs),
            desc=f"tokenize {split}",
        )
        # a record the loss cannot see would only add a NaN-prone all-masked row: drop it, say which
        empty = np.flatnonzero(column(tokenized, "n_supervised") == 0)
        self.dropped[split] = len(empty)
        if len(empty):
            rows = column(tokenized, "row")[empty[:3]].tolist()
            origin = self.source.origins.get(split, split)
            rank_zero_warn(f"{split}: dropped {len(empty)} record(s) with no target token left to train on "
                           f"(e.g. {origin} rows {rows}); check data.source_max_len / data.target_max_len")
            tokenized = tokenized.filter(lambda n: n > 0, input_columns="n_supervised", batched=False)
            if len(tokenized) == 0:
                raise DataError(f"{origin}: no record of the {split} split has a target token to train on")
        return tokenized

    def prompts(self, split: str) -> datasets.Dataset:
        """Prompt-only tokenization of a split's records, keeping output/references for scoring. Records
        that share a prompt (E2E: one MR, several references) appear once."""
        ds = self.records[split]
        if get_task(self.task).group_references and split != "predict":
            seen: set = set()

            def first(ins: list, inp: list) -> list[bool]:
                keep = []
                for key in zip(ins, inp):
                    keep.append(key not in seen)
                    seen.add(key)
                return keep

            ds = ds.filter(first, input_columns=["instruction", "input"], batched=True, load_from_cache_file=False)
        if self.chat:
            function, kwargs = conversation_prompts, dict(options=self.conversation,
                                                          origin=self.source.origins.get(split, split))
        else:
            function, kwargs = tokenize_prompts, dict(template=self.template)
        return ds.map(
            function,
            batched=True,
            fn_kwargs=dict(tokenizer=self.tokenizer, source_max_len=self.source_max_len, **kwargs),
            desc="prompts",
        )

    # ------------------------------------------------------------------------------ loaders
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_sampler(self) -> RecordBatchSampler:
        """The training batch sampler: seeded, resumable, and the same global batches on any number of ranks
        (N ranks with `batch_size` B take, at each step, the records one process with N x B takes)."""
        world, rank = self._world()
        lengths = column(self.tokenized["train"], "length")
        return RecordBatchSampler(
            None, self.batch_size, lengths=lengths, max_tokens=self.max_tokens, packed=self.packing,
            group_by_length=self.group_by_length, seed=self.seed, num_replicas=world, rank=rank,
        )

    def _pad_collator(self) -> PadCollator:
        return PadCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def train_dataloader(self) -> DataLoader:
        ds = self.tokenized["train"].with_format(None)
        collate = PackCollator() if self.packing else self._pad_collator()
        sampler = self.train_sampler()
        if len(sampler) == 0:  # the ranges of data.batch_size / data.max_tokens make this unreachable: kept as a guard
            raise DataError(f"data.batch_size: {self.batch_size} makes no training batch of "
                            f"{len(self.tokenized['train'])} records; give at least 1")
        self._log_statistics(sampler)
        # StatefulDataLoader: Lightning saves its position (sampler state, batches yielded) in checkpoints,
        # so a resumed run continues with the very batches an unbroken run would have seen (on other data, by
        # data.resume_changed_data, it starts the plan over: resume.py)
        return FreshStartLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                                persistent_workers=self.num_workers > 0, fresh_start=self._fresh_start)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What the training data and batching were (Lightning saves it in every checkpoint; `resume.py`)."""
        if "train" not in self.tokenized:
            return {}
        if self._record is None:
            self._record = data_record(self)
        return {"data_record": self._record}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: refuse a checkpoint of other data or batching unless data.resume_changed_data is set."""
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit" and "train" in self.tokenized:
            self._fresh_start = check_resume(state_dict, self.state_dict(), self.resume_changed_data)

    def _loader(self, ds: datasets.Dataset, batch_size: int, collate: Any) -> DataLoader:
        """Evaluation and prediction batches, in the dataset's order."""
        return StatefulDataLoader(ds.with_format(None), batch_size=batch_size, collate_fn=collate,
                                  num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(
            self.tokenized["validation"], self.eval_batch_size, self._pad_collator()
        )

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.tokenized:
            raise DataError(f"data.test_path: task {self.task!r} has no test split here; set data.test_path")
        return self._loader(self.tokenized["test"], self.eval_batch_size, self._pad_collator())

    def predict_dataloader(self) -> DataLoader:
        return self._loader(
            self.prompts("predict"), self.eval_batch_size, PromptCollator(self.tokenizer.pad_token_id)
        )

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a generated answer: EOS and the chat template's end-of-turn token (found by rendering
        the template once per template, not once per generation batch)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if self._stop_ids is None or self._stop_ids[0] != template:
            self._stop_ids = (template, stop_token_ids(self.tokenizer))
        return self._stop_ids[1]

    def decode(self, tokens: torch.Tensor) -> tuple[list[str], list[bool]]:
        """Generated ids (B, new) -> each answer's text, cut at its first stop token; and whether it stopped there
        (False: it ran to max_new_tokens)."""
        rows, stopped = cut_at_stop(tokens, self.stop_ids)
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)], stopped

    # ------------------------------------------------------------------------------ statistics
    def statistics(self, sampler: Optional[RecordBatchSampler] = None) -> dict[str, float]:
        """Records, tokens, supervised tokens, truncation and the padding of the first epoch's batches
        (`sampler`: the training sampler, made here when not given)."""
        ds = self.tokenized["train"]
        lengths = column(ds, "length")
        batches = (sampler or self.train_sampler()).global_plan(0)
        slots = sum(len(b) * padded_length(int(lengths[b].max()), self.pad_to_multiple_of) for b in batches)
        tokens = int(lengths.sum())
        return {
            "data/records": len(lengths),
            "data/tokens": tokens,
            "data/supervised_tokens": int(column(ds, "n_supervised").sum()),
            "data/mean_tokens": tokens / max(len(lengths), 1),
            "data/records_truncated": int(column(ds, "truncated").sum()),
            "data/records_dropped": self.dropped.get("train", 0),
            "data/padding_fraction": 0.0 if self.packing else 1 - tokens / max(slots, 1),
            "data/batches_per_epoch": len(batches),
        }

    def _log_statistics(self, sampler: RecordBatchSampler) -> None:
        trainer = self.trainer
        if self._stats_logged or trainer is None or trainer.state.fn != "fit":
            return
        self._stats_logged = True
        stats = self.statistics(sampler)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(stats, step=0)
        rank_zero_info("data: " + ", ".join(
            f"{k[5:]} {v:,.3f}" if isinstance(v, float) else f"{k[5:]} {v:,}" for k, v in stats.items()
        ))
