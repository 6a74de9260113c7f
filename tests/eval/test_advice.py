"""Advice from the evidence (eval/advice.py): still improving, overfitting, forgetting, each on
constructed loss histories, and a tiny training run whose summary.json advice follows from its
own metrics."""

import json

import pytest

from tuneforge.eval.advice import (
    MIX_DOC,
    advice,
    forgetting,
    overfitting,
    still_improving,
)
from tuneforge.eval.overfitting import LossCurves, read_curves

from ..conftest import ROOT, tiny_config, write_jsonl


def curves(evals, train=None, best=None, stopped=False) -> LossCurves:
    """Loss curves with an eval every 10 steps; train loss every step, falling by default."""
    last = evals[-1][0] if evals else 30
    if train is None:
        train = [(s, 2.0 - 0.01 * s) for s in range(1, last + 1)]
    if best is None and evals:
        best = min(evals, key=lambda x: x[1])[0]
    return LossCurves(train, evals, best, last, stopped)


# -- still improving --------------------------------------------------------------------------------
def test_still_improving_when_the_last_evals_each_fell_by_more_than_noise():
    c = curves([(10, 1.2), (20, 1.0), (30, 0.99)])  # the last drop: 1.0%
    line = still_improving(c)
    assert line.startswith("Still improving: eval loss fell at each of the last 2 evaluations")
    assert "(1.2000 -> 1.0000 -> 0.9900 at step 30, the best)" in line
    assert "training.num_epochs" in line and "training.learning_rate" in line
    assert advice(c, early_stopping_patience=0) == [line]


@pytest.mark.parametrize(
    "evals",
    [
        [(10, 1.2), (20, 1.0), (30, 0.996)],  # flat tail: the last drop (0.4%) is noise
        [(10, 1.0), (20, 0.98), (30, 0.99), (40, 0.979)],  # noisy: up, then down to a new best
        [(10, 1.2), (20, 1.0)],  # two evaluations: one drop is not a trend
        [(10, 1.2), (20, 0.9), (30, 1.0)],  # the best is not the last
    ],
)
def test_not_still_improving_on_a_flat_or_noisy_tail(evals):
    c = curves(evals)
    assert still_improving(c) is None
    assert not any(line.startswith("Still improving") for line in advice(c, 0))


def test_not_still_improving_when_the_run_stopped_early_or_kept_no_best():
    evals = [(10, 1.2), (20, 1.0), (30, 0.9)]
    assert still_improving(curves(evals, stopped=True)) is None
    no_best = curves(evals)
    no_best.best_step = None  # training.max_kl: no evaluation was within it
    assert still_improving(no_best) is None


# -- overfitting --------------------------------------------------------------------------------------
def test_overfitting_with_early_stopping_off_says_what_was_kept_and_to_turn_it_on():
    c = curves([(10, 1.0), (20, 0.8), (30, 0.85)])  # train loss falls all along
    line = overfitting(c, early_stopping_patience=0, objective="sft")
    # train loss: mean over steps 11..20 = 2 - 0.01 * 15.5; over 21..30 = 2 - 0.01 * 25.5
    assert line.startswith(
        "Overfitting: eval loss rose from 0.8000 at step 20 (its best) to 0.8500 at step 30 "
        "while train loss fell from 1.8450 to 1.7450; the saved weights are those of step 20"
    )
    assert "set training.early_stopping_patience" in line and "data.augment" in line
    assert advice(c, 0) == [line]


def test_overfitting_after_early_stopping_says_it_kept_the_best_step():
    c = curves([(10, 1.0), (20, 0.8), (30, 0.85), (40, 0.9)], stopped=True)
    line = overfitting(c, early_stopping_patience=2, objective="dpo")
    assert "training stopped early and kept the weights of step 20." in line
    assert "early_stopping_patience" not in line  # it was on, and it fired
    assert "lower training.learning_rate" in line and "data.augment" not in line  # sft only


def test_overfitting_with_early_stopping_on_that_did_not_fire_says_fewer_epochs():
    c = curves([(10, 1.0), (20, 0.8), (30, 0.85)])
    line = overfitting(c, early_stopping_patience=3, objective="sft")
    assert "Next time train fewer epochs (or a smaller training.early_stopping_patience)" in line


@pytest.mark.parametrize(
    "evals, train",
    [
        # eval rose, but so did train loss (the run got worse everywhere, not overfitting)
        ([(10, 1.0), (20, 0.8), (30, 0.9)], [(s, 1.0 + 0.01 * s) for s in range(1, 31)]),
        # eval rose by 0.4% of its best: noise
        ([(10, 1.0), (20, 0.8), (30, 0.8032)], None),
        # the best is the last evaluation
        ([(10, 1.0), (20, 0.9), (30, 0.8)], None),
        # train loss flat
        ([(10, 1.0), (20, 0.8), (30, 0.9)], [(s, 1.5) for s in range(1, 31)]),
    ],
)
def test_no_overfitting_advice_without_divergence(evals, train):
    c = curves(evals, train)
    assert overfitting(c, 0, "sft") is None
    assert not any(line.startswith("Overfitting") for line in advice(c, 0))


def test_no_curve_advice_without_eval_loss():
    """PPO and GRPO runs log eval rewards, runs without eval data nothing: no eval loss."""
    c = LossCurves([(s, 2.0 - 0.01 * s) for s in range(1, 31)], [], 20, 30, False)
    assert advice(c, 0) == []


# -- forgetting ---------------------------------------------------------------------------------------
def test_forgetting_over_ten_percent_advises_data_mix_with_the_measured_effect():
    line = forgetting(0.12)
    assert line.startswith("Forgetting: general-text perplexity rose +12.0% (more than +10%)")
    assert "data.mix" in line and "examples/general/general_instructions.jsonl" in line
    assert "+8.4% to -1.5%" in line and MIX_DOC in line
    assert advice(curves([]), 0, perplexity_change=0.12) == [line]
    other = forgetting(0.12, objective="dpo")
    assert "data.mix" in other and "general_instructions" not in other  # sft records only


@pytest.mark.parametrize("change", [0.08, 0.10, -0.05, None])
def test_no_forgetting_advice_within_ten_percent(change):
    assert forgetting(change) is None
    assert advice(curves([]), 0, perplexity_change=change) == []


def test_the_quoted_mix_figures_are_the_documented_measurement():
    """The numbers the advice quotes are those of the section its link names."""
    doc = (ROOT / MIX_DOC.split("#")[0]).read_text()
    assert "\n## Mixing general data in reduces forgetting\n" in doc
    assert MIX_DOC.endswith("#mixing-general-data-in-reduces-forgetting")
    assert "| dates only | 33.390 | +8.4% | 95.0% |" in doc
    assert "| dates + general | 30.339 | -1.5% | 95.0% |" in doc
    assert "17% of\nthe rows" in doc


# -- where the advice is shown ----------------------------------------------------------------------
def test_the_sft_report_and_printed_summary_show_the_advice(tmp_path):
    from tuneforge.eval.evaluate import summary_lines
    from tuneforge.eval.report import write_report

    from .test_report import sample_results

    r = sample_results(tmp_path)
    assert "## Advice" not in write_report(tmp_path, r)["report.md"].read_text()
    r["advice"] = [forgetting(0.12), "Still improving: <b>x</b>"]
    write_report(tmp_path, r)
    md = (tmp_path / "report.md").read_text()
    assert f"## Advice\n\n{r['advice'][0]}\n\nStill improving: <b>x</b>\n" in md
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Advice</h2>" in html and "<p>Still improving: &lt;b&gt;x&lt;/b&gt;</p>" in html
    lines = summary_lines(r)
    assert lines[lines.index(r["overfitting"]["text"]) + 1 :][:2] == r["advice"]


@pytest.mark.parametrize("change, advised", [(0.12, True), (0.08, False)])
def test_the_preference_eval_shows_the_forgetting_advice_over_ten_percent(change, advised):
    from tuneforge.eval.evaluate import summary_lines
    from tuneforge.eval.preference import advice_lines, guards, report_markdown, verdict_lines

    r = {"run": "runs/x", "objective": "dpo", "data": "d.jsonl", "examples": 4}
    r["forgetting"] = {"base_perplexity": 30.0, "relative_change": change}
    r["guards"], r["intact"] = guards(r)
    r["verdict"] = verdict_lines(r)
    r["advice"] = advice_lines(r)
    assert r["advice"] == ([forgetting(change, "dpo")] if advised else [])
    assert ("Forgetting: general-text perplexity rose" in report_markdown(r)) == advised
    assert ("Forgetting: general-text perplexity rose" in "\n".join(summary_lines(r))) == advised
    assert advice_lines({"objective": "reward"}) == []  # a reward run measures no perplexity


# -- end to end -----------------------------------------------------------------------------------
def test_a_training_run_writes_advice_that_follows_from_its_own_metrics(tmp_path, capsys):
    """A short full fine-tune whose eval loss still falls fast at the end: summary.json says
    so, the run prints it after the saved line, and the line equals the advice computed from
    its metrics.jsonl."""
    from tuneforge.train import train

    rows = [json.loads(x) for x in (ROOT / "examples/dates/train.jsonl").read_text().splitlines()]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:32])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows[32:40])
    cfg = tiny_config(
        tmp_path,
        train_file,
        eval_file,
        **{
            "method.name": "full",
            "training.max_steps": 6,
            "training.eval_steps": 2,
            "training.learning_rate": 1e-2,
            "training.lr_scheduler": "constant",
        },
    )
    summary = train(cfg)
    run = tmp_path / "run"
    saved = json.loads((run / "summary.json").read_text())
    assert saved["advice"] == summary["advice"]

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    losses = [loss for _, loss in evals]
    assert [s for s, _ in evals] == [2, 4, 6] and saved["best_step"] == 6
    # the condition by hand: each of the last two evals below the one before by more than 0.5%
    assert losses[1] < 0.995 * losses[0] and losses[2] < 0.995 * losses[1]
    assert len(saved["advice"]) == 1 and saved["advice"][0].startswith("Still improving")
    assert f"{losses[2]:.4f} at step 6, the best" in saved["advice"][0]
    assert saved["advice"] == advice(read_curves(run), 0)

    err = capsys.readouterr().err.splitlines()
    at = next(i for i, line in enumerate(err) if line.startswith("saved "))
    assert err[at + 1 :] == saved["advice"]
