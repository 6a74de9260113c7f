"""Task metrics against hand-worked numbers and the reference libraries (sacrebleu, rouge-score)."""

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tuneforge.eval import metrics as M


def test_exact_match_ignores_surrounding_and_repeated_whitespace_only():
    preds = ["2020-01-02", "  2020-01-03\n", "2020-01-04 ", "2020-1-5", "a  b"]
    refs = ["2020-01-02", "2020-01-03", "2020-01-04", "2020-01-05", "a b"]
    assert M.exact_match(preds, refs) == pytest.approx(80.0)  # 4 of 5
    assert M.exact_match_scores(preds, refs) == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_token_f1_squad_normalisation_hand_worked():
    """ "The cat sat on the mat." vs "a cat on a mat": normalised [cat, sat, on, mat] and
    [cat, on, mat]; 3 shared -> precision 3/4, recall 1, F1 = 2*0.75/1.75 = 6/7."""
    assert M.normalize_answer("The Cat, sat on THE mat!") == "cat sat on mat"
    assert M.token_f1_one("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    # Repeated tokens count only as often as they appear in both (multiset overlap):
    # pred [x, x, y], ref [x, y, y] -> common 2, P = R = 2/3, F1 = 2/3.
    assert M.token_f1_one("x x y", "x y y") == pytest.approx(2 / 3)
    assert M.token_f1_one("", "") == 1.0 and M.token_f1_one("the", "cat") == 0.0
    assert M.token_f1(["The cat sat on the mat.", "dog"], ["a cat on a mat", "dog"]) == (
        pytest.approx(100 * (6 / 7 + 1) / 2)
    )


def test_accuracy_over_a_label_set():
    labels = ["positive", "negative", "neutral"]
    assert M.predicted_label("Positive.", labels) == "positive"
    assert M.predicted_label("The sentiment is negative", labels) == "negative"
    assert M.predicted_label("positive or negative", labels) is None  # names two labels
    assert M.predicted_label("nonpositive", labels) is None  # whole words only
    assert M.predicted_label("I cannot tell", labels) is None
    preds = ["Positive.", "The sentiment is negative", "positive or negative", "neutral"]
    refs = ["positive", "positive", "negative", "neutral"]
    assert M.accuracy(preds, refs, labels) == pytest.approx(50.0)  # rows 1 and 4
    # Without a label set the distinct references are the labels.
    assert M.accuracy(["yes", "no!"], ["yes", "yes"]) == pytest.approx(50.0)


def test_bleu_hand_worked_and_equal_to_sacrebleu():
    """pred "the cat sat on the mat", ref "the cat sat on a mat": clipped n-gram precisions
    5/6, 3/5, 2/4, 1/3, equal lengths so no brevity penalty:
    BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = 0.53728..."""
    pred, ref = ["the cat sat on the mat"], ["the cat sat on a mat"]
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25
    assert M.bleu(pred, ref) == pytest.approx(expected, abs=1e-6)
    preds = ["the quick brown fox", "jumps over the lazy dog", "hello"]
    refs = ["a quick brown fox", "jumped over the lazy dog", "hello there"]
    assert M.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)


def test_chrf_extremes_and_equal_to_sacrebleu():
    assert M.chrf(["identical text"], ["identical text"]) == pytest.approx(100.0)
    assert M.chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    preds = ["the quick brown fox", "jumps over the lazy dog"]
    refs = ["a quick brown fox", "jumped over the lazy dog"]
    assert M.chrf(preds, refs) == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)


def test_rouge_hand_worked_and_equal_to_rouge_score():
    """pred "the cat sat", ref "the cat sat on the mat": ROUGE-1 P 3/3 R 3/6 -> F 2/3;
    ROUGE-2 P 2/2 R 2/5 -> F 4/7; ROUGE-L LCS 3 -> P 1, R 1/2 -> F 2/3."""
    p, r = ["the cat sat"], ["the cat sat on the mat"]
    assert M.rouge(p, r, "rouge1") == pytest.approx(100 * 2 / 3)
    assert M.rouge(p, r, "rouge2") == pytest.approx(100 * 4 / 7)
    assert M.rouge(p, r, "rougeL") == pytest.approx(100 * 2 / 3)
    preds = ["police killed the gunman", "the runner was running fast"]
    refs = ["the gunman was shot dead by police", "a runner runs quickly"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    ref_value = (
        100
        * sum(scorer.score(b, a)["rougeL"].fmeasure for a, b in zip(preds, refs, strict=True))
        / 2
    )
    assert M.task_metrics(["rougeL"], preds, refs)["rougeL"] == pytest.approx(ref_value)


def test_perplexity_hand_worked():
    assert M.perplexity(6.0, 3) == pytest.approx(math.exp(2))
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)


def test_paired_bootstrap_interval_brackets_the_difference():
    a = [1.0] * 30 + [0.0] * 10
    b = [1.0] * 30 + [1.0] * 10  # b better on the last 10: difference -25 points
    lo, hi = M.paired_bootstrap_ci(a, b, seed=1)
    assert lo <= -25.0 <= hi and hi < 0
    assert M.paired_bootstrap_ci([1.0, 0.0], [1.0, 0.0]) == (0.0, 0.0)


def test_unknown_metric_is_a_one_line_error():
    from tuneforge.errors import TuneforgeError

    with pytest.raises(TuneforgeError, match="unknown metric 'blue'; choose from exact_match"):
        M.check_metric_names(["exact_match", "blue"])
