"""Generation metrics, as pure functions: ROUGE-1/2/L and corpus BLEU of generated texts against every
reference (the callback that generates and logs them: callbacks/generation_metrics.py).

Scores are percentages, as papers report them. ROUGE is torchmetrics' `ROUGEScore` F-measure with
`accumulate="best"` (per prompt, the best-matching reference), Porter-stemmed by default (rouge-score's stemmer,
which needs nltk). BLEU is sacrebleu's corpus BLEU (13a tokenization, n-grams clipped by their most frequent
count in any reference, closest reference length), the form E2E NLG reports, with all references of every
prompt; prompts with fewer references are padded with None, which sacrebleu skips.
"""

from __future__ import annotations

from typing import Sequence

import sacrebleu
from torchmetrics.functional.text import rouge_score

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
