"""Prompting baselines on the user's own held-out data: the "fine-tune or just prompt?" question.

Four systems answer the same prompts with the same decoding:

* ``base zero-shot``   - the base model, prompted with the question alone;
* ``base few-shot``    - the base model with ``k`` solved training examples as earlier chat turns;
* ``fine-tuned``       - the fine-tuned model, prompted as in training;
* ``fine-tuned + few-shot`` - the fine-tuned model with the same few-shot turns.

``verdict`` compares the fine-tuned model with the better of the two prompting baselines on the
first metric of ``eval.metrics`` and says plainly who won and by how much.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tuneforge.data.dataset import load_conversations
from tuneforge.data.records import Messages
from tuneforge.errors import TuneforgeError
from tuneforge.eval.metrics import LOSS_METRICS, example_scores, paired_bootstrap_ci

BASE_ZERO = "base zero-shot"
BASE_FEW = "base few-shot"
TUNED = "fine-tuned"
TUNED_FEW = "fine-tuned + few-shot"
GGUF = "fine-tuned GGUF (llama.cpp)"  # eval --gguf: the exported file, run by llama.cpp
PROMPTING = (BASE_ZERO, BASE_FEW)
# Loss-like metrics are better when lower.
LOWER_IS_BETTER = {"eval_loss", "perplexity"}


@dataclass
class EvalSet:
    """Held-out prompts with their reference answers and where each came from."""

    prompts: list[Messages]
    references: list[str]
    sources: list[str]
    path: str

    @property
    def conversations(self) -> list[Messages]:
        """Prompt + reference answer (for loss on the answers)."""
        return [
            [*p, {"role": "assistant", "content": r}]
            for p, r in zip(self.prompts, self.references, strict=True)
        ]


def load_eval_set(
    path: str, fmt: str = "auto", system_prompt: str | None = None, max_examples: int = 0
) -> EvalSet:
    """Read held-out data; each record's last assistant turn is the reference answer.

    Raises:
        TuneforgeError: unreadable or invalid records (file:line and field named).
    """
    convs, sources = load_conversations(path, fmt, system_prompt)
    if max_examples:
        convs, sources = convs[:max_examples], sources[:max_examples]
    prompts, refs = [], []
    for conv, source in zip(convs, sources, strict=True):
        if conv[-1]["role"] != "assistant":
            raise TuneforgeError(
                f"{source}: the last message must be the assistant's reference answer"
            )
        prompts.append(conv[:-1])
        refs.append(conv[-1]["content"])
    return EvalSet(prompts, refs, sources, str(path))


def _question(prompt: Messages) -> str:
    return prompt[-1]["content"].strip()


def few_shot_examples(
    train_path: str,
    k: int,
    seed: int,
    exclude: EvalSet,
    fmt: str = "auto",
    system_prompt: str | None = None,
) -> list[tuple[str, str]]:
    """``k`` single-turn (question, answer) pairs drawn from the training split, by seed.

    Pairs whose question also appears in the eval set are never chosen (no answer leaks in).

    Raises:
        TuneforgeError: the training split has fewer than ``k`` usable examples.
    """
    if k == 0:
        return []
    convs, _ = load_conversations(train_path, fmt, system_prompt)
    held_out = {_question(p) for p in exclude.prompts}
    pool = []
    for conv in convs:
        turns = [m for m in conv if m["role"] != "system"]
        if len(turns) == 2 and turns[0]["content"].strip() not in held_out:
            pool.append((turns[0]["content"], turns[1]["content"]))
    if len(pool) < k:
        raise TuneforgeError(
            f"{train_path}: only {len(pool)} single-turn training examples for "
            f"eval.few_shot_k={k}; lower eval.few_shot_k"
        )
    return random.Random(seed).sample(pool, k)


def with_few_shot(prompt: Messages, shots: list[tuple[str, str]]) -> Messages:
    """The prompt with the solved examples as earlier user/assistant turns (after any system)."""
    head = [m for m in prompt[:1] if m["role"] == "system"]
    turns = [
        turn
        for q, a in shots
        for turn in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    return [*head, *turns, *prompt[len(head) :]]


def better(metric: str, a: float, b: float) -> bool:
    """Whether score ``a`` beats ``b`` on ``metric``."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def best_prompting(scores: dict[str, dict[str, float]], metric: str) -> str:
    """The prompting baseline (zero- or few-shot) with the better score on ``metric``."""
    present = [s for s in PROMPTING if s in scores and metric in scores[s]]
    best = present[0]
    for s in present[1:]:
        if better(metric, scores[s][metric], scores[best][metric]):
            best = s
    return best


def verdict(
    scores: dict[str, dict[str, float]],
    metric: str,
    predictions: dict[str, list[str]] | None = None,
    references: list[str] | None = None,
    labels: list[str] | None = None,
    seed: int = 0,
) -> dict:
    """Did fine-tuning beat prompting on ``metric``, and by how much?

    Returns:
        A dict with ``baseline`` (the better prompting system), the two scores, ``difference``
        (fine-tuned minus baseline, in the metric's units), ``ci95`` (paired bootstrap interval
        of the difference, for metrics that are means over examples), ``won`` and ``text``.
    """
    base = best_prompting(scores, metric)
    tuned, other = scores[TUNED][metric], scores[base][metric]
    diff = tuned - other
    ci = None
    if predictions and references is not None and metric not in LOSS_METRICS:
        a = example_scores(metric, predictions[TUNED], references, labels)
        b = example_scores(metric, predictions[base], references, labels)
        if a is not None and b is not None:
            ci = paired_bootstrap_ci(a, b, seed=seed)
    won = better(metric, tuned, other)
    if won:
        head = "Fine-tuning beat prompting"
    elif tuned == other:
        head = "Fine-tuning tied with prompting"
    else:
        head = "Fine-tuning did NOT beat prompting"
    text = (
        f"{head} on {metric}: fine-tuned {tuned:.2f} vs {base} {other:.2f} "
        f"(difference {diff:+.2f}" + (f", 95% CI {ci[0]:+.2f} to {ci[1]:+.2f}" if ci else "") + ")."
    )
    if TUNED_FEW in scores and metric in scores[TUNED_FEW]:
        combo = scores[TUNED_FEW][metric]
        if better(metric, combo, tuned):
            text += f" Adding the few-shot examples to the fine-tuned model helps: {combo:.2f}."
        else:
            text += (
                f" Adding few-shot examples to the fine-tuned model does not help ({combo:.2f})."
            )
    return {
        "metric": metric,
        "baseline": base,
        "fine_tuned": tuned,
        "baseline_score": other,
        "difference": diff,
        "ci95": list(ci) if ci else None,
        "won": won,
        "text": text,
    }
