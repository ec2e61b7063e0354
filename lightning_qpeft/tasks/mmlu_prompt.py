"""MMLU prompts exactly as Hendrycks' `evaluate.py` builds them, and therefore as QLoRA's data/mmlu files hold them.

    The following are multiple choice questions (with answers) about  abstract algebra.\\n\\n
    <k solved dev questions, each "Q\\nA. a\\nB. b\\nC. c\\nD. d\\nAnswer: X\\n\\n">
    <the question, "Q\\nA. a\\nB. b\\nC. c\\nD. d\\nAnswer:">

Quirks kept on purpose, because QLoRA's files (and every number quoted against them) have them:
- `format_subject` prefixes every underscore-separated word with a space, so "about" is followed by two spaces.
- The text is used as it is in the CSV: no stripping (some dev questions start with a space or end in "\\n").
- Five-shot: k starts at `shots` and is lowered by one until the prompt has at most `max_prompt_tokens` tokens
  (counted without special tokens; Hendrycks' `crop` at 2048). With the LLaMA-2 tokenizer at 2048 this
  reproduces five_shot_mmlu_{val,test}.json byte for byte (k histogram on val: 5: 1475, 4: 19, 3: 31, 2: 6).
- The dev examples are the first k rows of the subject's dev file, in file order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from lightning_qpeft.core.errors import ConfigError


CHOICES = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"


@dataclass(frozen=True)
class Question:
    """One multiple-choice question, as a row of an MMLU CSV file.

    Attributes:
        subject: e.g. `abstract_algebra` (underscores, as the file names have them).
        question: the question text.
        choices: the four options, in A-D order.
        answer: the correct letter, `A`-`D`.
    """

    subject: str
    question: str
    choices: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class Item:
    """One question ready to score: its full prompt and the correct letter.

    Attributes:
        subject: the question's subject.
        prompt: the whole prompt (header, k solved examples, the question, ending in "Answer:").
        answer: the correct letter.
        k: solved examples in the prompt (None when unknown).
    """

    subject: str
    prompt: str
    answer: str
    k: Optional[int] = None


def format_subject(subject: str) -> str:
    """`abstract_algebra` -> ` abstract algebra` (the leading space is Hendrycks' and QLoRA's)."""
    return "".join(" " + word for word in subject.split("_"))


def header(subject: str) -> str:
    return HEADER.format(format_subject(subject))


def format_example(q: Question, include_answer: bool = True) -> str:
    """The question and its options; solved examples end in " X\\n\\n", the asked question in "Answer:"."""
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(CHOICES, q.choices)) + "\nAnswer:"
    return text + f" {q.answer}\n\n" if include_answer else text


def build_prompt(q: Question, dev: Sequence[Question], k: int) -> str:
    """Header, the first `k` dev examples solved, then `q` (Hendrycks' `gen_prompt` + `format_example`)."""
    return header(q.subject) + "".join(format_example(d) for d in dev[:k]) + format_example(q, include_answer=False)


def build_items(
    questions: Sequence[Question],
    dev: dict[str, Sequence[Question]],
    shots: int,
    count_tokens: Optional[Callable[[list[str]], list[int]]] = None,
    max_prompt_tokens: Optional[int] = None,
    start_k: Optional[Sequence[int]] = None,
) -> list[Item]:
    """Prompts for `questions` with `shots` solved dev examples of the same subject, k lowered per question
    until the prompt fits `max_prompt_tokens` (as counted by `count_tokens`, a batched token counter).

    `start_k` gives each question its own k to start from instead of `shots` (k already known, as
    `mmlu_files` knows the LLaMA-2 tokenizer's k without that tokenizer).

    Raises:
        ValueError: a subject has fewer than `shots` dev examples.
    """
    if shots > 0:
        for subject in sorted({q.subject for q in questions}):
            if len(dev.get(subject, ())) < shots:
                raise ConfigError(
                    "mmlu.shots", f"{shots} solved examples asked for, but subject {subject!r} has "
                    f"{len(dev.get(subject, ()))} dev questions"
                )
    ks = list(start_k) if start_k is not None else [shots] * len(questions)
    prompts = [build_prompt(q, dev.get(q.subject, ()), k) for q, k in zip(questions, ks, strict=True)]
    if count_tokens is not None and max_prompt_tokens is not None:
        todo = list(range(len(questions)))
        while todo:  # batched: every round re-counts only the prompts that were still too long
            lengths = count_tokens([prompts[i] for i in todo])
            todo = [i for i, n in zip(todo, lengths) if n > max_prompt_tokens and ks[i] > 0]
            for i in todo:
                ks[i] -= 1
                prompts[i] = build_prompt(questions[i], dev[questions[i].subject], ks[i])
    return [Item(q.subject, p, q.answer, k) for q, p, k in zip(questions, prompts, ks)]
