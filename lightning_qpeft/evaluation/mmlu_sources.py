"""MMLU items from the source `mmlu.source` names: scored `Item`s (subject, prompt, answer letter, k), read from
any layout (`mmlu_data`), QLoRA's files built first where they are missing (`mmlu_files`), then optionally sampled.

Config keys (`mmlu.*`, see `lightning_qpeft.callbacks.mmlu`):
    source:             `json`: QLoRA's files (`{"subject","input","output"}` one object a line, prompts already
                        built: five_shot_mmlu_val.json ...); `csv`: the original folders
                        (`<path>/{dev,val,test}/<subject>_<split>.csv`, header-less question,A,B,C,D,answer);
                        `hub`: the `cais/mmlu` dataset through `datasets.load_dataset`; `synthetic`: the
                        project's generated multiple-choice set (`lightning_qpeft.tasks.synthetic_mc`)
    path:               the JSON file or the CSV folder; one of QLoRA's file names that is missing is built
                        from the CSVs beside it (`mmlu_files`: data/mmlu/five_shot_mmlu_val.json)
    split:              val or test (csv, hub, synthetic)
    shots:              solved dev examples per prompt (csv, hub, synthetic; QLoRA's files are built already)
    max_prompt_tokens:  k is lowered per question until the prompt fits (Hendrycks' 2048)
    max_samples, sample_seed: the first N questions (QLoRA's `max_mmlu_samples`), or N drawn with a seed
"""

from __future__ import annotations

import random
from typing import Any, Optional, Sequence

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.evaluation.mmlu_data import read_csv_folder, read_hub, read_qlora_json, token_counter
from lightning_qpeft.evaluation.mmlu_files import build_on_demand
from lightning_qpeft.tasks import synthetic_mc
from lightning_qpeft.tasks.mmlu_prompt import Item, build_items

SOURCES = ("synthetic", "json", "csv", "hub")
SPLITS = ("val", "test")


def load_items(
    source: str,
    tokenizer: Any,
    path: Optional[str] = None,
    split: str = "val",
    shots: int = 5,
    max_prompt_tokens: Optional[int] = 2048,
    hub_name: str = "cais/mmlu",
    synthetic_questions: int = 40,
) -> list[Item]:
    """Scored items from any layout (see the module docstring for the arguments)."""
    if source not in SOURCES:
        raise ConfigError("mmlu.source", repr(source), f"choose one of {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise ConfigError("mmlu.split", repr(split), "choose val or test")
    if source in ("json", "csv") and path is None:
        raise ConfigError("mmlu.path", f"mmlu.source {source} needs a path (a QLoRA .json file or a CSV folder)")
    if source == "json":
        build_on_demand(path)  # data/mmlu's prompt files, from the CSVs beside them, when not built yet
        return read_qlora_json(path)
    if source == "csv":
        questions, dev = read_csv_folder(path, split)
    elif source == "hub":
        questions, dev = read_hub(hub_name, split)
    else:
        questions = synthetic_mc.questions(split, synthetic_questions)
        dev = {}
        for q in synthetic_mc.questions("dev", 5):
            dev.setdefault(q.subject, []).append(q)
    return build_items(questions, dev, shots, token_counter(tokenizer), max_prompt_tokens)


def select(items: Sequence[Item], max_samples: Optional[int], seed: Optional[int] = None) -> list[Item]:
    """The first `max_samples` items (QLoRA's `max_mmlu_samples`: with sorted subjects, the first few subjects
    only), or, with a seed, `max_samples` drawn without replacement and kept in file order."""
    if max_samples is None or max_samples >= len(items):
        return list(items)
    if seed is None:
        return list(items[:max_samples])
    keep = sorted(random.Random(seed).sample(range(len(items)), max_samples))
    return [items[i] for i in keep]
