"""Task metrics. Each is checked in tests against a reference library or hand-worked numbers.

Every metric takes predictions and references (lists of strings, same length) and returns a score
on a 0-100 scale, except perplexity. Metrics that are means over examples also have a per-example
form (``example_scores``), which the paired bootstrap uses to put an interval on a difference.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from tuneforge.errors import TuneforgeError


def normalize_exact(text: str) -> str:
    """Trim and collapse whitespace (exact match is otherwise strict)."""
    return " ".join(text.strip().split())


def exact_match_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where a prediction equals its reference after whitespace normalisation, else 0.0."""
    return [
        float(normalize_exact(p) == normalize_exact(r))
        for p, r in zip(predictions, references, strict=True)
    ]


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share (0-100) of predictions equal to their reference after trimming whitespace."""
    return _mean100(exact_match_scores(predictions, references))


# -- SQuAD-style token F1 --------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation, drop articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1_one(prediction: str, reference: str) -> float:
    """Token-overlap F1 of one pair, as the SQuAD v1.1 evaluation script computes it.

    Worked example: prediction "The cat sat on the mat", reference "a cat on a mat" normalise to
    [cat, sat, on, mat] and [cat, on, mat]; 3 tokens are shared, so precision 3/4, recall 3/3,
    F1 = 2 * 0.75 * 1 / 1.75 = 0.857142...
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example token F1 (0-1)."""
    return [token_f1_one(p, r) for p, r in zip(predictions, references, strict=True)]


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean SQuAD-style token F1, 0-100."""
    return _mean100(token_f1_scores(predictions, references))


# -- accuracy over a label set ----------------------------------------------------------------------
def _norm_label(text: str) -> str:
    return " ".join(text.lower().strip().strip(string.punctuation + " ").split())


def predicted_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label a free-text prediction names, or None when it names none or several.

    The prediction is first compared whole with each label (case, outer punctuation and spaces
    ignored): "Positive." names "positive". Otherwise a label counts if it is the only one that
    appears as a whole word or phrase: "The sentiment is positive" names "positive";
    "positive or negative" names neither.
    """
    norm = _norm_label(prediction)
    by_norm = {_norm_label(label): label for label in labels}
    if norm in by_norm:
        return by_norm[norm]
    found = [
        label
        for key, label in by_norm.items()
        if key and re.search(rf"(?<!\w){re.escape(key)}(?!\w)", norm)
    ]
    return found[0] if len(found) == 1 else None


def accuracy_scores(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> list[float]:
    """1.0 where the label a prediction names (see ``predicted_label``) is its reference's label.

    Args:
        labels: the label set; None uses the distinct references.
    """
    labels = list(labels) if labels else sorted(set(references))
    out = []
    for p, r in zip(predictions, references, strict=True):
        label = predicted_label(p, labels)
        out.append(float(label is not None and _norm_label(label) == _norm_label(r)))
    return out


def accuracy(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> float:
    """Accuracy (0-100) over a label set; a prediction naming no label (or several) is wrong."""
    return _mean100(accuracy_scores(predictions, references, labels))


# -- generation overlap metrics (reference libraries) ---------------------------------------------
def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def rouge_scores(
    predictions: Sequence[str], references: Sequence[str], kind: str = "rougeL"
) -> list[float]:
    """Per-example ROUGE F-measure (0-1) from ``rouge-score`` with Porter stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
    return [scorer.score(r, p)[kind].fmeasure for p, r in zip(predictions, references, strict=True)]


def rouge(predictions: Sequence[str], references: Sequence[str], kind: str = "rougeL") -> float:
    """Mean ROUGE-1 / ROUGE-2 / ROUGE-L F-measure (``kind``), 0-100."""
    return _mean100(rouge_scores(predictions, references, kind))


# -- perplexity --------------------------------------------------------------------------------------
def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per token); e.g. a summed NLL of 6.0 nats over 3 tokens
    gives exp(2) = 7.389..."""
    if tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(nll_sum / tokens)


# -- registry ----------------------------------------------------------------------------------------
ScoreFn = Callable[[Sequence[str], Sequence[str]], float]
ExampleFn = Callable[[Sequence[str], Sequence[str]], list[float]]

# name -> (corpus score, per-example scores or None for corpus-level metrics)
TASK_METRICS: dict[str, tuple[ScoreFn, ExampleFn | None]] = {
    "exact_match": (exact_match, exact_match_scores),
    "token_f1": (token_f1, token_f1_scores),
    "accuracy": (accuracy, accuracy_scores),
    "bleu": (bleu, None),
    "chrf": (chrf, None),
    "rouge1": (lambda p, r: rouge(p, r, "rouge1"), lambda p, r: rouge_scores(p, r, "rouge1")),
    "rouge2": (lambda p, r: rouge(p, r, "rouge2"), lambda p, r: rouge_scores(p, r, "rouge2")),
    "rougeL": (lambda p, r: rouge(p, r, "rougeL"), lambda p, r: rouge_scores(p, r, "rougeL")),
}
# Metrics computed from the model's loss on the reference answers, not from generated text.
LOSS_METRICS = ("eval_loss", "perplexity")
METRIC_NAMES = (*TASK_METRICS, *LOSS_METRICS)


def check_metric_names(names: Sequence[str], where: str = "'eval.metrics'") -> None:
    """Raise a one-line error for an unknown metric name."""
    for name in names:
        if name not in METRIC_NAMES:
            raise TuneforgeError(
                f"{where}: unknown metric '{name}'; choose from {', '.join(METRIC_NAMES)}"
            )


def task_metrics(
    names: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
) -> dict[str, float]:
    """Score predictions with each named text metric (loss metrics are skipped here)."""
    out = {}
    for name in names:
        if name in LOSS_METRICS:
            continue
        if name == "accuracy":
            out[name] = accuracy(predictions, references, labels)
        else:
            out[name] = TASK_METRICS[name][0](predictions, references)
    return out


def example_scores(
    name: str,
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
) -> list[float] | None:
    """Per-example scores (0-1) of a metric that is a mean over examples; None for corpus metrics."""
    if name == "accuracy":
        return accuracy_scores(predictions, references, labels)
    fn = TASK_METRICS.get(name, (None, None))[1]
    return fn(predictions, references) if fn else None


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(a) - mean(b) over the same examples, x100."""
    import numpy as np

    _check_lengths(a, b)
    if len(a) == 0:
        return (0.0, 0.0)
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diffs), size=(samples, len(diffs)))
    means = diffs[picks].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (100.0 * float(lo), 100.0 * float(hi))


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")


def _mean100(scores: list[float]) -> float:
    return 100.0 * sum(scores) / len(scores) if scores else 0.0
