"""MMLU evaluation as QLoRA and Hendrycks define it: prompts (`tasks/mmlu_prompt.py`) from any layout
(`mmlu_sources.py`), scored on the A-D logits (`mmlu_scoring.py`), aggregated here into metrics and a report.

Metrics (what `MMLUResults.metrics` returns and the callback logs):
    mmlu/accuracy          mean over questions: the number papers quote (Hendrycks' "Average accuracy")
    mmlu/accuracy_macro    mean over subjects of the subject accuracies: what QLoRA logs as mmlu_*_accuracy
    mmlu/loss              mean over questions of the cross-entropy of the correct letter among the four letters
    mmlu/lm_loss           mean over questions of -log p(correct letter) under the full vocabulary (QLoRA's
                           mmlu_loss is the LM loss of the letter and EOS, averaged over batches: this is its
                           letter term, per question)
    mmlu/<subject>         accuracy of each subject
    mmlu/category/<name>   stem, humanities, social_sciences, other: mean over the category's questions

Usage without Lightning:

    items = load_items("csv", tokenizer, "data/mmlu", split="val", shots=5)
    results = MMLUEvaluator(items, tokenizer).evaluate(model, device)
    print(results.metrics()["mmlu/accuracy"])
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional, Sequence

import torch

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.evaluation.mmlu_scoring import (
    PADDING_SIDES,
    encode_prompts,
    letter_token_ids,
    plan_batches,
    score,
)
from lightning_qpeft.tasks.mmlu_categories import CATEGORIES, METRIC_NAMES, category_of
from lightning_qpeft.tasks.mmlu_prompt import CHOICES, Item


@dataclass
class MMLUResults:
    """Per-question scores and what follows from them.

    Attributes:
        items: the questions, in their order.
        scores: (N, 8) float32: the four letter logits, then the four letters' full-vocabulary log-probabilities.
        seconds: wall time of the scoring.
        tokens: prompt tokens scored (BOS included, padding excluded).
        truncated: prompts cut to `max_length`.
    """

    items: list[Item]
    scores: torch.Tensor
    seconds: float = 0.0
    tokens: int = 0
    truncated: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @cached_property  # scores do not change: argmax once, not at every metric, report and log
    def predictions(self) -> list[str]:
        return [CHOICES[i] for i in self.scores[:, :4].argmax(dim=1).tolist()]

    @cached_property
    def correct(self) -> list[bool]:
        return [p == it.answer for p, it in zip(self.predictions, self.items)]

    def _answers(self) -> torch.Tensor:
        return torch.tensor([CHOICES.index(it.answer) for it in self.items])

    def _by(self, key: Callable[[Item], Optional[str]]) -> dict[str, list[bool]]:
        groups: dict[str, list[bool]] = {}
        for it, ok in zip(self.items, self.correct):
            name = key(it)
            if name is not None:
                groups.setdefault(name, []).append(ok)
        return groups

    def subject_accuracy(self) -> dict[str, float]:
        return {s: sum(v) / len(v) for s, v in sorted(self._by(lambda it: it.subject).items())}

    def category_accuracy(self) -> dict[str, float]:
        """Hendrycks' category names -> mean over their questions (categories with no question left out)."""
        groups = self._by(lambda it: category_of(it.subject))
        return {c: sum(groups[c]) / len(groups[c]) for c in CATEGORIES if c in groups}

    def metrics(self) -> dict[str, float]:
        answers = self._answers()
        letter_ce = torch.nn.functional.cross_entropy(self.scores[:, :4], answers)
        lm_nll = -self.scores[:, 4:].gather(1, answers[:, None]).mean()
        subjects = self.subject_accuracy()
        out = {
            "mmlu/accuracy": sum(self.correct) / len(self.items),
            "mmlu/accuracy_macro": sum(subjects.values()) / len(subjects),
            "mmlu/loss": letter_ce.item(),
            "mmlu/lm_loss": lm_nll.item(),
        }
        out.update({f"mmlu/category/{METRIC_NAMES[c]}": v for c, v in self.category_accuracy().items()})
        out.update({f"mmlu/{s}": v for s, v in subjects.items()})
        return out

    def report(self, **context: Any) -> dict[str, Any]:
        """A JSON-ready report: overall, categories, subjects and every question (with the k it was asked with)."""
        m = self.metrics()
        probs = torch.softmax(self.scores[:, :4], dim=1)
        subjects: dict[str, Any] = {}
        for it, ok in zip(self.items, self.correct):
            s = subjects.setdefault(it.subject, {"category": category_of(it.subject), "questions": 0, "correct": 0,
                                                 "k": Counter()})
            s["questions"] += 1
            s["correct"] += int(ok)
            s["k"][str(it.k)] += 1
        for name, s in subjects.items():
            s["accuracy"] = s["correct"] / s["questions"]
            s["k"] = dict(sorted(s["k"].items()))
        groups = self._by(lambda it: category_of(it.subject))
        return {
            **context,
            **self.info,
            "overall": {
                "accuracy": m["mmlu/accuracy"],
                "accuracy_macro": m["mmlu/accuracy_macro"],
                "loss": m["mmlu/loss"],
                "lm_loss": m["mmlu/lm_loss"],
                "questions": len(self.items),
                "subjects": len(subjects),
            },
            "metric_definitions": {
                "accuracy": "mean over questions",
                "accuracy_macro": "mean over subjects of the subject accuracies (QLoRA's mmlu_*_accuracy)",
                "loss": "cross-entropy of the correct letter among the four letter logits, mean over questions",
                "lm_loss": "-log p(correct letter token) under the full vocabulary, mean over questions",
                "categories": "mean over the questions of the category's subjects (Hendrycks)",
            },
            "categories": {c: {"accuracy": sum(groups[c]) / len(groups[c]), "questions": len(groups[c])}
                           for c in CATEGORIES if c in groups},
            "subjects": dict(sorted(subjects.items())),
            "k_histogram": dict(sorted(Counter(str(it.k) for it in self.items).items())),
            "timing": {"seconds": round(self.seconds, 3), "tokens": self.tokens, "truncated_prompts": self.truncated,
                       "questions_per_s": round(len(self.items) / self.seconds, 2) if self.seconds else None},
            "questions": [
                {"subject": it.subject, "k": it.k, "answer": it.answer, "prediction": pred, "correct": ok,
                 "probs": [round(p, 5) for p in pr]}
                for it, pred, ok, pr in zip(self.items, self.predictions, self.correct, probs.tolist())
            ],
        }


class MMLUEvaluator:
    """Tokenizes the items once, then scores any model on them, on one rank or sharded over several.

    Args:
        items: the questions to score.
        tokenizer: the model's tokenizer (its BOS starts every prompt, as in QLoRA's collator).
        letter_tokens: qlora or continuation (see `mmlu_scoring.letter_token_ids`).
        max_length: most tokens a prompt keeps, BOS included (QLoRA's mmlu_source_max_len, 2048).
        batch_tokens: token budget of a batch: rows x padded length.
        batch_size: most rows in a batch.
        padding_side: right (QLoRA) or left.
    """

    def __init__(
        self,
        items: Sequence[Item],
        tokenizer: Any,
        letter_tokens: str = "qlora",
        max_length: int = 2048,
        batch_tokens: int = 16384,
        batch_size: int = 64,
        padding_side: str = "right",
    ) -> None:
        if not items:
            raise ValueError("mmlu: no questions to evaluate")
        if padding_side not in PADDING_SIDES:
            raise ConfigError("mmlu.padding_side", repr(padding_side), "choose right or left")
        if batch_tokens < 1 or batch_size < 1 or max_length < 2:
            raise ValueError("mmlu.batch_tokens, mmlu.batch_size >= 1 and mmlu.max_length >= 2 are needed")
        self.items = list(items)
        self.letter_ids = letter_token_ids(tokenizer, letter_tokens)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoded, self.truncated = encode_prompts(tokenizer, [it.prompt for it in self.items], max_length)
        self.batches = plan_batches([len(x) for x in self.encoded], batch_tokens, batch_size)
        self.padding_side = padding_side
        self.info = {"letter_tokens": dict(zip(CHOICES, self.letter_ids)),
                     "letter_token_strings": dict(zip(CHOICES, tokenizer.convert_ids_to_tokens(self.letter_ids))),
                     "padding_side": padding_side, "max_length": max_length}

    def evaluate(
        self,
        model: torch.nn.Module,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        all_reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        forward_context: Optional[Callable[[], Any]] = None,
    ) -> MMLUResults:
        """Score every item. With `world_size` > 1 this rank scores every `world_size`-th batch (batches are
        planned longest first, so the shares are balanced) and `all_reduce_sum` adds the ranks' results."""
        device = torch.device(device)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            scores = score(model, self.encoded, self.letter_ids, self.pad_id, device, self.batches[rank::world_size],
                           self.padding_side, forward_context)
        finally:
            model.train(was_training)
        if world_size > 1:
            if all_reduce_sum is None:
                raise ValueError("MMLUEvaluator.evaluate: world_size > 1 needs all_reduce_sum")
            scores = all_reduce_sum(scores)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return MMLUResults(self.items, scores.cpu(), time.perf_counter() - start, sum(map(len, self.encoded)),
                           self.truncated, dict(self.info))
