"""Overfitting view from a run's metrics.jsonl: train and eval loss curves, their gap, and where
early stopping chose the best step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import TuneforgeError


@dataclass
class LossCurves:
    """Loss curves of one run. ``gap`` is eval loss minus the mean train loss of the steps since
    the previous evaluation (the train loss the eval point should be compared with)."""

    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    last_step: int = 0
    stopped_early: bool = False

    def train_loss_near(self, step: int, previous: int) -> float | None:
        """Mean train loss over steps in (previous, step]."""
        window = [loss for s, loss in self.train if previous < s <= step]
        return sum(window) / len(window) if window else None

    def gaps(self) -> list[tuple[int, float]]:
        """(step, eval loss - train loss) at each evaluation."""
        out, prev = [], 0
        for step, ev in self.eval:
            tr = self.train_loss_near(step, prev)
            if tr is not None:
                out.append((step, ev - tr))
            prev = step
        return out

    def summary(self) -> dict:
        """Numbers for the report: best step, the eval loss there and at the end, gaps."""
        gaps = dict(self.gaps())
        evals = dict(self.eval)
        best = self.best_step
        last_eval = self.eval[-1][0] if self.eval else None
        out = {
            "steps": self.last_step,
            "evaluations": len(self.eval),
            "best_step": best,
            "best_eval_loss": evals.get(best) if best else None,
            "final_eval_loss": evals.get(last_eval) if last_eval else None,
            "gap_at_best": gaps.get(best) if best else None,
            "final_gap": gaps.get(last_eval) if last_eval else None,
            "stopped_early": self.stopped_early,
            "final_train_loss": self.train[-1][1] if self.train else None,
        }
        out["text"] = describe(out)
        return out


def describe(s: dict) -> str:
    """One or two plain sentences about overfitting."""
    if not s["evaluations"]:
        return (
            "No eval loss was logged (the run had no eval data), so overfitting cannot be judged."
        )
    text = f"Best eval loss {s['best_eval_loss']:.4f} at step {s['best_step']} of {s['steps']}"
    text += "; training stopped early there." if s["stopped_early"] else "."
    if s["final_gap"] is not None:
        text += f" Final gap (eval - train loss): {s['final_gap']:+.4f}"
        if s["gap_at_best"] is not None and s["final_gap"] > s["gap_at_best"] + 1e-9:
            text += (
                f", up from {s['gap_at_best']:+.4f} at the best step: the model began to overfit."
            )
        else:
            text += "."
    if s["best_step"] and s["best_step"] != s["steps"]:
        text += f" The saved weights are those of step {s['best_step']}."
    return text


def read_curves(run_dir: str | Path) -> LossCurves:
    """Parse metrics.jsonl (and summary.json, for early stopping) of a run folder.

    Raises:
        TuneforgeError: metrics.jsonl is missing or has a malformed line.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise TuneforgeError(f"{path}: missing; is '{run_dir}' a finished training run?")
    curves = LossCurves()
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise TuneforgeError(f"{path}:{i}: not a metrics record") from None
        curves.last_step = max(curves.last_step, step)
        if "loss" in rec:
            curves.train.append((step, float(rec["loss"])))
        if "eval_loss" in rec:
            curves.eval.append((step, float(rec["eval_loss"])))
            if rec.get("best_step") is not None:
                curves.best_step = int(rec["best_step"])
    if curves.eval and curves.best_step is None:
        curves.best_step = min(curves.eval, key=lambda x: x[1])[0]
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            curves.stopped_early = bool(json.loads(summary.read_text()).get("stopped_early"))
        except json.JSONDecodeError:
            pass
    return curves
