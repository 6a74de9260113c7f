"""Advice where the evidence is: one plain line each when a run was still improving, began to
overfit, or forgot general text, saying what to change. Pure functions of a run's loss curves
(``eval.overfitting.read_curves``) and the measured perplexity change; ``tuneforge train``
writes them into summary.json, ``tuneforge eval`` into eval.json and the report.

The thresholds are in docs/evaluation.md ("Advice").
"""

from __future__ import annotations

from itertools import pairwise

from tuneforge.eval.degeneration import LIMITS
from tuneforge.eval.overfitting import LossCurves

# A relative change in a loss smaller than this is noise, not a trend.
NOISE = 0.005
# Drops in eval loss, one per evaluation, that count as "still improving".
FALLING_EVALS = 2
# General-text perplexity may rise this much (relative) before forgetting is advised against:
# the same limit as the guard of preference and RL runs.
FORGETTING = LIMITS["perplexity_change"]

# Measured in docs/evaluation.md (bench/forgetting_bench.py --steps 20, dates task, LoRA).
MIX_DOC = "docs/evaluation.md#mixing-general-data-in-reduces-forgetting"
MIX_MEASURED = (
    "measured on the dates task, 17% general rows took the change from +8.4% to -1.5% at the "
    "same 95% exact match"
)


def advice(
    curves: LossCurves,
    early_stopping_patience: int,
    perplexity_change: float | None = None,
    objective: str = "sft",
) -> list[str]:
    """The advice lines for a run (empty when there is nothing to advise).

    Args:
        curves: train and eval loss history, best step and whether early stopping fired; a run
            without eval loss (no eval data; ppo and grpo, which evaluate rewards) gets no
            advice on its curves.
        early_stopping_patience: the run's ``training.early_stopping_patience`` (0: off).
        perplexity_change: general-text perplexity of the fine-tuned model over the base's,
            minus 1 (None: not measured).
        objective: the run's ``training.objective`` (``data.augment`` is for sft only).

    Returns:
        Plain sentences, one per finding.
    """
    lines = [
        still_improving(curves),
        overfitting(curves, early_stopping_patience, objective),
        forgetting(perplexity_change, objective),
    ]
    return [line for line in lines if line]


def _fell(before: float, after: float) -> bool:
    """``after`` is lower than ``before`` by more than noise."""
    return after < before * (1 - NOISE)


def still_improving(curves: LossCurves) -> str | None:
    """Eval loss fell, by more than noise, at each of the last ``FALLING_EVALS`` evaluations,
    and the last is the best."""
    evals = curves.eval
    if len(evals) < FALLING_EVALS + 1 or curves.stopped_early:
        return None
    last_step, last = evals[-1]
    if curves.best_step != last_step:
        return None
    tail = [loss for _, loss in evals[-FALLING_EVALS - 1 :]]
    if not all(_fell(a, b) for a, b in pairwise(tail)):
        return None
    path = " -> ".join(f"{x:.4f}" for x in tail)
    return (
        f"Still improving: eval loss fell at each of the last {FALLING_EVALS} evaluations "
        f"({path} at step {last_step}, the best); training longer (more "
        "training.num_epochs) or a higher training.learning_rate may help."
    )


def _train_loss_between(curves: LossCurves, previous: int, step: int) -> float | None:
    """Mean train loss over steps in (previous, step]; else the last logged at or before step."""
    mean = curves.train_loss_near(step, previous)
    if mean is not None:
        return mean
    earlier = [loss for s, loss in curves.train if s <= step]
    return earlier[-1] if earlier else None


def overfitting(curves: LossCurves, early_stopping_patience: int, objective: str) -> str | None:
    """Eval loss rose from its best by more than noise while train loss kept falling: what the
    run kept and what to change."""
    evals = curves.eval
    steps = [s for s, _ in evals]
    if curves.best_step not in steps or curves.best_step == steps[-1]:
        return None
    i = steps.index(curves.best_step)
    best_step, best = evals[i]
    last_step, last = evals[-1]
    train_at_best = _train_loss_between(curves, steps[i - 1] if i else 0, best_step)
    train_at_last = _train_loss_between(curves, steps[-2], last_step)
    if train_at_best is None or train_at_last is None:
        return None
    if last <= best * (1 + NOISE) or not _fell(train_at_best, train_at_last):
        return None
    seen = (
        f"Overfitting: eval loss rose from {best:.4f} at step {best_step} (its best) to "
        f"{last:.4f} at step {last_step} while train loss fell from {train_at_best:.4f} to "
        f"{train_at_last:.4f}; "
    )
    if curves.stopped_early:
        kept = f"training stopped early and kept the weights of step {best_step}."
    else:
        kept = f"the saved weights are those of step {best_step}, the best."
    data = "more data (or data.augment)" if objective == "sft" else "more data"
    if not early_stopping_patience:
        todo = (
            "Next time set training.early_stopping_patience (e.g. 3) or train fewer epochs; "
            f"{data} or a lower training.learning_rate lets it learn longer before it overfits."
        )
    elif curves.stopped_early:
        todo = f"To learn more before it overfits: {data} or a lower training.learning_rate."
    else:
        todo = (
            "Next time train fewer epochs (or a smaller training.early_stopping_patience); "
            f"{data} or a lower training.learning_rate lets it learn longer before it overfits."
        )
    return seen + kept + " " + todo


def forgetting(perplexity_change: float | None, objective: str = "sft") -> str | None:
    """General-text perplexity rose more than ``FORGETTING``: mix general data in."""
    if perplexity_change is None or perplexity_change <= FORGETTING:
        return None
    example = (
        " (e.g. [{path: examples/general/general_instructions.jsonl, ratio: 0.2}])"
        if objective == "sft"
        else " (general records in the run's own format)"
    )
    return (
        f"Forgetting: general-text perplexity rose {perplexity_change:+.1%} (more than "
        f"+{FORGETTING:.0%}); mix general data into training with data.mix{example}: "
        f"{MIX_MEASURED} ({MIX_DOC})."
    )
