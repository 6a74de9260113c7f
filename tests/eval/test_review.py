"""Blind A/B review sheets: random sides, a separate key, and the win rate with a Wilson CI."""

import csv

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.eval.review import (
    key_path_for,
    parse_rating,
    score_review_sheet,
    wilson_interval,
    write_review_sheet,
)


def test_wilson_interval_hand_worked():
    """14 of 20: p 0.7, z^2/n 0.19207; centre 0.79604/1.19207 = 0.66778; half-width
    1.96*sqrt(0.0105 + 0.0024010)/1.19207 = 0.18675 -> (0.4810, 0.8545)."""
    lo, hi = wilson_interval(14, 20)
    assert lo == pytest.approx(0.4810, abs=1e-4) and hi == pytest.approx(0.8545, abs=1e-4)
    # 0 of 10 is not (0, 0): Wilson gives an upper bound of z^2/(n+z^2) = 3.8415/13.8415.
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_review_sheet_round_trip(tmp_path):
    n = 23
    prompts = [f"Question {i}, with a comma\nand a new line" for i in range(n)]
    ft = [f"fine-tuned answer {i}" for i in range(n)]
    base = [f"baseline answer {i}" for i in range(n)]
    sheet, key = write_review_sheet(tmp_path / "review.csv", prompts, ft, base, "base few-shot", 7)
    assert key == key_path_for(sheet) == tmp_path / "review.key.csv"
    rows, keys = _read(sheet), _read(key)
    assert [r["prompt"] for r in rows] == prompts  # CSV quoting survives commas and newlines
    # The sheet is blind: no column says which side is which; the key does.
    assert set(rows[0]) == {"id", "prompt", "answer_a", "answer_b", "rating", "comment"}
    sides = [k["fine_tuned_side"] for k in keys]
    assert {"A", "B"} == set(sides)  # randomised, not always the same side
    for row, k in zip(rows, keys, strict=True):
        ft_answer = row["answer_a"] if k["fine_tuned_side"] == "A" else row["answer_b"]
        assert ft_answer.startswith("fine-tuned") and k["baseline"] == "base few-shot"
    # Another seed gives another assignment; the same seed the same one.
    write_review_sheet(tmp_path / "again.csv", prompts, ft, base, "x", 7)
    assert [k["fine_tuned_side"] for k in _read(tmp_path / "again.key.csv")] == sides
    write_review_sheet(tmp_path / "other.csv", prompts, ft, base, "x", 8)
    assert [k["fine_tuned_side"] for k in _read(tmp_path / "other.key.csv")] != sides

    # A reviewer prefers the fine-tuned answer 14 times, the baseline 6 times, 2 ties, 1 blank.
    other = {"A": "b", "B": "a"}
    plan = ["ft"] * 14 + ["base"] * 6 + ["tie", "Tie"] + [""]
    for row, k, what in zip(rows, keys, plan, strict=True):
        side = k["fine_tuned_side"]
        row["rating"] = {"ft": side, "base": other[side]}.get(what, what)
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = score_review_sheet(sheet)
    assert (r["wins"], r["losses"], r["ties"], r["unrated"]) == (14, 6, 2, 1)
    assert r["win_rate"] == pytest.approx(0.7)
    assert r["ci95"] == pytest.approx([0.4810, 0.8545], abs=1e-4)
    assert r["win_rate_ties_half"] == pytest.approx(15 / 22)
    assert "14 of 20 decisive comparisons: win rate 70.0% (95% Wilson CI 48.1-85.5%)" in r["text"]


def _sheet_with(tmp_path, edit):
    sheet, _ = write_review_sheet(tmp_path / "r.csv", ["p1", "p2"], ["f1", "f2"], ["b1", "b2"], "b")
    rows = _read(sheet)
    edit(rows)
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return sheet


def test_review_sheet_mistakes_are_one_line_errors(tmp_path):
    sheet = _sheet_with(tmp_path, lambda rows: rows[1].update(rating="maybe"))
    with pytest.raises(TuneforgeError, match=r"r\.csv:3: rating 'maybe' is not A, B or tie"):
        score_review_sheet(sheet)
    sheet = _sheet_with(tmp_path, lambda rows: rows[0].update(answer_a="edited"))
    with pytest.raises(TuneforgeError, match=r"r\.csv:2: prompt or answers differ"):
        score_review_sheet(sheet)
    sheet = _sheet_with(tmp_path, lambda rows: rows[0].update(id="99"))
    with pytest.raises(TuneforgeError, match=r"r\.csv:2: id '99' is not in the key file"):
        score_review_sheet(sheet)
    (tmp_path / "r.key.csv").unlink()
    with pytest.raises(TuneforgeError, match="review key file not found"):
        score_review_sheet(sheet)


def test_parse_rating():
    assert [parse_rating(x) for x in ("a", " B ", "tie", "=", "", None)] == [
        "A",
        "B",
        "tie",
        "tie",
        None,
        None,
    ]
    with pytest.raises(ValueError):
        parse_rating("C")
