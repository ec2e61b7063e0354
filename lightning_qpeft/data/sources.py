"""Where records come from (built-in tasks, local files, the Hugging Face hub) and the one record schema
every source is turned into.

Config keys (`data.*`):
    task:        a name in `TASKS` (synthetic-e2e, alpaca, alpaca-cleaned, dolly, oasst1, samsum, samsum-chat,
                 xsum, e2e, e2e-lora, file, hub)
    path, val_path, test_path: local files of the train / validation / test split (readers.py lists the
                 formats); a given file replaces the task's built-in or hub data for its split
    hub_id, hub_config, hub_kwargs: what `datasets.load_dataset` loads when no `path` is given (default:
                 the task's upstream hub id); `hub_kwargs` is passed on as is (data_files, revision, ...)
    instruction_field, prompt_field, response_field, references_field: the source columns holding the
                 canonical `instruction`, `input`, `output` and `references` (when the task's own layouts do
                 not fit the file)

The canonical record (`CANONICAL`): `instruction` (may be ''), `input` (may be ''), `output` (the target
text), `references` (every acceptable output, for generation metrics; `[output]` unless the source has
several) and `row` (the record's 1-based position in its file, for messages). A task knows the column
layouts its data comes in (`Layout`) and picks the first that fits the file's columns. Conversations
(`messages`, ShareGPT, OASST trees: `conversations.py`) are recognised for every task and add a `messages`
column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import datasets

from lightning_qpeft.core.data_error import DataError
from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.data.conversations import CONVERSATIONS, OASST_TABLE, OASST_TREES, SAMSUM_CHAT, ConversationLayout
from lightning_qpeft.data.random_tokens import random_token_splits
from lightning_qpeft.data.readers import read_file, record_word
from lightning_qpeft.tasks.synthetic_e2e import synthetic_e2e
from lightning_qpeft.tasks.synthetic_mc import synthetic_mc_splits

__all__ = ["CANONICAL", "DataError", "Layout", "Task", "TASKS", "TaskSource", "get_task"]

CANONICAL = ("instruction", "input", "output", "references", "row")
FIELD_KEYS = {"instruction": "instruction_field", "input": "prompt_field", "output": "response_field",
              "references": "references_field"}
SPLITS = ("train", "validation", "test")
PATH_KEYS = {"train": "data.path", "validation": "data.val_path", "test": "data.test_path"}
PARQUET_EXPORT = "refs/convert/parquet"  # the hub's automatic parquet conversion of every public dataset


@dataclass(frozen=True)
class Layout:
    """A column layout a task's data comes in.

    Attributes:
        name: for messages.
        columns: canonical field -> source column; all must be present (`output` only where targets are).
        optional: canonical field -> source column, used when present.
        template: the prompt template this layout implies (None: the task's).
        convert: batch -> batch of canonical columns, for layouts that are more than renamed columns.
        crlf: turn CRLF line breaks into LF (SAMSum CSVs break every dialogue line with CRLF).
    """

    name: str
    columns: dict[str, str]
    optional: dict[str, str] = field(default_factory=dict)
    template: Optional[str] = None
    convert: Optional[Callable[[dict[str, list]], dict[str, list]]] = None
    crlf: bool = False

    def fits(self, columns: set[str], need_output: bool) -> bool:
        return all(src in columns for f, src in self.columns.items() if need_output or f != "output")


def _oasst1(batch: dict[str, list]) -> dict[str, list]:
    # qlora.py: `{'input': '', 'output': x['text']}` with the input-output format: the whole
    # '### Human: ... ### Assistant: ...' conversation is the target, the prompt is BOS alone
    return {"output": batch["text"]}


def _lora_e2e(batch: dict[str, list]) -> dict[str, list]:
    # microsoft/LoRA format_converting_e2e.py: line.strip().split('||') -> context, completion
    parts = [(t or "").strip().split("||") for t in batch["text"]]
    return {"input": [p[0] for p in parts], "output": [p[1] if len(p) > 1 else None for p in parts]}


def _dolly_prompt(batch: dict[str, list]) -> dict[str, list]:
    # prompt/answer exports end every answer with a literal '###eos_token###': we append the real EOS
    suffix = "###eos_token###"
    answers = [a[: -len(suffix)] if isinstance(a, str) and a.endswith(suffix) else a for a in batch["answer"]]
    return {"input": batch["prompt"], "output": answers}


ALPACA = Layout("instruction/input/output", {"instruction": "instruction", "output": "output"}, {"input": "input"})
INPUT_OUTPUT = Layout("input/output", {"input": "input", "output": "output"}, template="plain")
PROMPT_COMPLETION = Layout("prompt/completion", {"input": "prompt", "output": "completion"}, template="plain")
DOLLY = Layout("dolly", {"instruction": "instruction", "output": "response"}, {"input": "context"})
DOLLY_PROMPT = Layout("dolly prompt/answer", {"input": "prompt", "output": "answer"}, template="plain",
                      convert=_dolly_prompt)
OASST1 = Layout("guanaco text", {"output": "text"}, template="plain", convert=_oasst1)
SAMSUM = Layout("dialogue/summary", {"input": "dialogue", "output": "summary"}, crlf=True)
XSUM = Layout("document/summary", {"input": "document", "output": "summary"}, crlf=True)
CNN = Layout("article/highlights", {"input": "article", "output": "highlights"}, crlf=True)
E2E_CSV = Layout("mr/ref", {"input": "mr", "output": "ref"})
E2E_TEST_CSV = Layout("MR", {"input": "MR", "output": "ref"})  # testset.csv: upper-case header, no refs
E2E_HUB = Layout("meaning_representation/human_reference",
                 {"input": "meaning_representation", "output": "human_reference"})
LORA_E2E = Layout("mr||ref text", {"input": "text", "output": "text"}, convert=_lora_e2e)
GENERIC = (*CONVERSATIONS, ALPACA, INPUT_OUTPUT, PROMPT_COMPLETION)


@dataclass(frozen=True)
class Task:
    """A named task.

    Attributes:
        name: the config value of `data.task`.
        template: default prompt template.
        layouts: column layouts its data comes in, tried in order (the generic ones are tried after).
        hub_id: the upstream `datasets` hub id, loaded when no local file is given.
        hub_config: the hub dataset's config name.
        builtin: seed -> (train, validation, test) record lists, for offline tasks.
        group_references: evaluation records with the same prompt are one prompt with all their outputs as
            references (E2E: several human references per meaning representation).
        description: one line for docs.
        tokens: for token-level tasks (no text): (vocab_size, source_len, target_len, train_on_source, seed) ->
            tokenized splits, which skip the template and the tokenizer.
    """

    name: str
    template: str
    layouts: tuple[Layout, ...] = ()
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    builtin: Optional[Callable[[int], tuple[list, list, list]]] = None
    group_references: bool = False
    description: str = ""
    tokens: Optional[Callable[..., dict[str, datasets.Dataset]]] = None


def _synthetic_e2e_splits(seed: int) -> tuple[list, list, list]:
    # separate seeds per split: validation and test meaning representations are unseen combinations
    return synthetic_e2e(2000, seed), synthetic_e2e(200, seed + 1), synthetic_e2e(200, seed + 2)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("synthetic-e2e", "alpaca", builtin=_synthetic_e2e_splits,
             description="built-in E2E-style data-to-text, generated offline"),
        # input: the zero-shot MMLU prompt, as the MMLU scorer builds it; output: the answer letter
        Task("synthetic-mc", "plain", builtin=synthetic_mc_splits,
             description="built-in MMLU-format multiple choice, generated offline"),
        Task("alpaca", "alpaca", (ALPACA,), "tatsu-lab/alpaca", description="Stanford Alpaca, 52K instructions"),
        Task("alpaca-cleaned", "alpaca", (ALPACA,), "yahma/alpaca-cleaned", description="Alpaca, cleaned"),
        Task("dolly", "alpaca", (DOLLY, DOLLY_PROMPT), "databricks/databricks-dolly-15k",
             description="Dolly 15k (instruction/context/response), or its prompt/answer exports"),
        Task("oasst1", "plain", (OASST_TABLE, OASST_TREES, OASST1), "timdettmers/openassistant-guanaco",
             description="OASST1 top conversations as QLoRA trains on them (a `text` field), or its message trees"),
        Task("samsum", "summarization", (SAMSUM,), "Samsung/samsum", description="SAMSum dialogue summaries"),
        Task("samsum-chat", "chat", (SAMSUM_CHAT,), "Samsung/samsum",
             description="SAMSum as two-exchange conversations: the summary, then who took part"),
        Task("xsum", "summarization", (XSUM, CNN), "EdinburghNLP/xsum",
             description="XSum-style document/summary (or article/highlights) files"),
        Task("e2e", "data_to_text", (E2E_CSV, E2E_TEST_CSV, E2E_HUB), "tuetschek/e2e_nlg", group_references=True,
             description="E2E NLG (CSV mr,ref; several references per MR)"),
        Task("e2e-lora", "data_to_text", (LORA_E2E,), group_references=True,
             description="E2E in the LoRA paper's `mr || ref` text form"),
        Task("file", "alpaca", description="a local instruction/input/output, input/output, prompt/completion or conversation file"),
        Task("hub", "alpaca", description="any dataset `datasets.load_dataset(data.hub_id)` reads"),
        Task("random-tokens", "plain", tokens=random_token_splits,
             description="fixed-length random token ids, for speed measurements (no text)"),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError("data.task", f"unknown task {name!r}", f"choose one of {', '.join(TASKS)}") from None


def _text(value: Any, name: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: '{name}' is not text (got {value!r})")
    return value


def _canonical_batch(batch: dict[str, list], indices: list[int], layout: Layout, origin: str, word: str,
                     need_output: bool) -> dict[str, list]:
    """A `datasets.map(batched=True, with_indices=True)` function: raw columns -> canonical columns."""
    n = len(indices)
    converted = layout.convert(batch) if layout.convert else {}
    sources = {**layout.optional, **layout.columns}
    sources.setdefault("references", "references")

    def column(f: str) -> list:
        if f in converted:
            return converted[f]
        return batch[sources[f]] if sources.get(f) in batch else [None] * n

    get = {f: column(f) for f in ("instruction", "input", "output")}
    refs = column("references")
    out: dict[str, list] = {k: [] for k in CANONICAL}
    for i, row in enumerate(indices):
        where = f"{origin}: {word} {row + 1}"
        output = get["output"][i]
        if need_output and not isinstance(output, str):
            raise DataError(f"{where} has no 'output' string (got {output!r})")
        texts = {f: _text(get[f][i], f, where) for f in ("instruction", "input", "output")}
        if layout.crlf:
            texts = {f: t.replace("\r\n", "\n") for f, t in texts.items()}
        r = refs[i]
        if r is None or (isinstance(r, list) and not r):
            r = [texts["output"]] if isinstance(output, str) else []
        elif isinstance(r, str):
            r = [r]
        elif not all(isinstance(x, str) for x in r):
            raise DataError(f"{where}: 'references' must be a list of strings (got {r!r})")
        for f in ("instruction", "input", "output"):
            out[f].append(texts[f])
        out["references"].append(list(r))
        out["row"].append(row + 1)
    return out


def _field_layout(task: Task, fields: dict[str, str], columns: set[str], origin: str) -> Layout:
    """The layout the user's `data.*_field` keys describe (other canonical columns are taken by name)."""
    for f, col in fields.items():
        if col not in columns:
            raise DataError(f"data.{FIELD_KEYS[f]}: {origin} has no column {col!r} (columns: {sorted(columns)})")
    optional = {f: f for f in ("instruction", "input", "references") if f in columns and f not in fields}
    has_instruction = "instruction" in fields or "instruction" in optional
    # the Alpaca template around an empty instruction is noise: without one, the prompt is the input itself
    template = "plain" if task.template == "alpaca" and not has_instruction else None
    required = {f: c for f, c in fields.items() if f != "references"}
    if "output" not in required and "output" in columns:
        required["output"] = "output"
    if "references" in fields:
        optional["references"] = fields["references"]
    return Layout("data.*_field", required, optional, template)


def canonicalise(ds: datasets.Dataset, task: Task, origin: str, word: str = "record",
                 fields: Optional[dict[str, str]] = None,
                 need_output: bool = True) -> tuple[datasets.Dataset, Layout | ConversationLayout]:
    """Raw records -> canonical records (`CANONICAL` columns only), and the layout that was recognised.

    Runs as a batched `datasets.map`, so a file-backed dataset is converted into another memory-mapped
    cache, never into one Python list.

    Raises:
        DataError: no layout fits the columns, a mapped column is missing, or a record lacks its output.
    """
    columns = set(ds.column_names)
    if fields:
        layout = _field_layout(task, fields, columns, origin)
    else:
        candidates = [*task.layouts, *GENERIC]
        layout = next((lay for lay in candidates if lay.fits(columns, need_output)), None)
        if layout is None:
            expected = "; ".join(f"{lay.name}" for lay in candidates)
            raise DataError(
                f"{origin}: no 'output' field and no known column layout for task {task.name!r} (columns: "
                f"{sorted(columns)}; expected one of: {expected}); name the columns with data.prompt_field, "
                "data.response_field, data.instruction_field"
            )
    if isinstance(layout, ConversationLayout):
        return layout.canonicalise(ds, origin, word, need_output), layout
    if need_output and "output" not in layout.columns:
        raise DataError(f"{origin}: no 'output' field; set data.response_field to the column of the targets")
    ds = ds.map(
        _canonical_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
        fn_kwargs=dict(layout=layout, origin=origin, word=word, need_output=need_output), desc="canonicalise",
    )
    return ds, layout


def group_references(ds: datasets.Dataset) -> datasets.Dataset:
    """Give every record all outputs of its prompt (instruction + input) as `references`.

    Builds one dict prompt -> outputs: evaluation splits only (E2E dev: 4,672 rows, 547 prompts).
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for batch in ds.iter(batch_size=4096):
        for ins, inp, out in zip(batch["instruction"], batch["input"], batch["output"]):
            groups.setdefault((ins, inp), []).append(out)
    return ds.map(lambda b: {"references": [groups[k] for k in zip(b["instruction"], b["input"])]},
                  batched=True, desc="group references")


class TaskSource:
    """The canonical records of one task's splits, from its built-in generator, local files or the hub.

    Per split, a local file wins; else the built-in data (when no train file is given); else the hub
    (`data.hub_id`, default the task's own). A split no source has is None: the data module then splits
    validation off train, and a missing test split is refused when `test` asks for it.

    Args:
        task: task name.
        files: split -> local file (or None).
        hub_id: `datasets.load_dataset` path; None: the task's.
        hub_config: the hub dataset's config name.
        hub_kwargs: more `load_dataset` arguments.
        fields: canonical field -> source column (the `data.*_field` keys that are set).
        seed: seed of the built-in data.
    """

    def __init__(self, task: str, files: dict[str, Optional[str]], hub_id: Optional[str] = None,
                 hub_config: Optional[str] = None, hub_kwargs: Optional[dict] = None,
                 fields: Optional[dict[str, str]] = None, seed: int = 42) -> None:
        self.task = get_task(task)
        self.files = {s: files.get(s) for s in SPLITS}
        self.hub_id = hub_id or self.task.hub_id
        self.hub_config = hub_config if hub_id else (hub_config or self.task.hub_config)
        self.hub_kwargs = dict(hub_kwargs or {})
        self.fields = dict(fields or {})
        self.seed = seed
        self.template: Optional[str] = None  # the recognised layout's template (None: the task's)
        self.origins: dict[str, str] = {}  # split -> file or hub split, for messages
        self._builtin: Optional[dict[str, list]] = None
        self._hub: Optional[datasets.DatasetDict] = None
        if self.task.name == "hub" and not hub_id and not files.get("train"):
            raise DataError("data.hub_id: task 'hub' loads data.hub_id with datasets.load_dataset; set it")

    def load(self, split: str) -> Optional[datasets.Dataset]:
        """The split's canonical records, or None when no source has it."""
        path = self.files[split]
        if path is not None:
            ds = self.read(path, PATH_KEYS[split])
        elif self.task.builtin is not None and self.files["train"] is None:
            if self._builtin is None:
                self._builtin = dict(zip(SPLITS, self.task.builtin(self.seed)))
            self.origins[split] = f"{self.task.name}[{split}]"
            ds = datasets.Dataset.from_list([{**r, "row": i + 1} for i, r in enumerate(self._builtin[split])])
        elif self.hub_id is not None and self.files["train"] is None:
            ds = self._load_hub(split)
        elif split == "train":
            raise DataError(f"data.path: task {self.task.name!r} needs a file (data.path) or a dataset (data.hub_id)")
        else:
            return None
        if ds is not None and split != "train" and self.task.group_references:
            ds = group_references(ds)
        return ds

    def read(self, path: str, key: str, need_output: bool = True) -> datasets.Dataset:
        """One local file as canonical records, with the task's layouts (and the user's field names)."""
        ds, layout = canonicalise(read_file(path, key), self.task, str(path), record_word(path), self.fields,
                                  need_output)
        self.origins.setdefault(_split_of(key), str(path))
        self._note_template(layout)
        return ds

    def _load_hub(self, split: str) -> Optional[datasets.Dataset]:
        if self._hub is None:
            try:
                try:
                    loaded = datasets.load_dataset(self.hub_id, self.hub_config, **self.hub_kwargs)
                except RuntimeError as e:
                    # datasets >= 4 runs no loading scripts; older hub datasets (samsum, xsum, e2e_nlg) keep
                    # theirs on main, but the hub's parquet export of them loads without code
                    if "scripts are no longer supported" not in str(e) or "revision" in self.hub_kwargs:
                        raise
                    loaded = datasets.load_dataset(self.hub_id, self.hub_config, revision=PARQUET_EXPORT,
                                                   **self.hub_kwargs)
            except Exception as e:
                raise DataError(
                    f"data.hub_id: datasets.load_dataset({self.hub_id!r}) failed ({type(e).__name__}: {e}); "
                    "without the hub, give local files in data.path / data.val_path / data.test_path"
                ) from e
            self._hub = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        names = {"validation": ("validation", "valid", "dev", "val"), "test": ("test",), "train": ("train",)}[split]
        name = next((n for n in names if n in self._hub), None)
        if name is None:
            if split == "train":
                raise DataError(f"data.hub_id: {self.hub_id!r} has no train split (splits: {list(self._hub)})")
            return None
        origin = f"{self.hub_id}[{name}]"
        self.origins[split] = origin
        ds, layout = canonicalise(self._hub[name], self.task, origin, "record", self.fields)
        self._note_template(layout)
        return ds

    def _note_template(self, layout: Layout | ConversationLayout) -> None:
        if self.template is None:
            self.template = layout.template or self.task.template


def _split_of(key: str) -> str:
    return {v: k for k, v in PATH_KEYS.items()}.get(key, "predict")
