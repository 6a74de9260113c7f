"""Human review: blind A/B sheets and their scoring (win rate with a Wilson 95% interval).

``write_review_sheet`` writes ``review.csv`` (id, prompt, answer_a, answer_b, rating, comment)
where the fine-tuned model's answer is put on side A or B at random (by seed), and a separate
key file (``review.key.csv``) that says which side is which; reviewers see only the sheet. They
fill ``rating`` with A, B or tie. ``score_review_sheet`` joins the two and reports how often the
fine-tuned model won.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import random
from pathlib import Path

from tuneforge.errors import TuneforgeError
from tuneforge.files import write_atomic

SHEET_COLUMNS = ("id", "prompt", "answer_a", "answer_b", "rating", "comment")
KEY_COLUMNS = ("id", "fine_tuned_side", "baseline", "checksum")
TIE_WORDS = {"tie", "t", "=", "same", "equal", "both", "neither"}


def key_path_for(sheet: str | Path) -> Path:
    """review.csv -> review.key.csv (same folder)."""
    sheet = Path(sheet)
    return sheet.with_name(sheet.stem + ".key" + (sheet.suffix or ".csv"))


def _checksum(prompt: str, a: str, b: str) -> str:
    return hashlib.sha256("\x1f".join((prompt, a, b)).encode()).hexdigest()[:16]


def _write_csv_atomic(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


def write_review_sheet(
    sheet: str | Path,
    prompts: list[str],
    fine_tuned: list[str],
    baseline: list[str],
    baseline_name: str,
    seed: int = 0,
    key: str | Path | None = None,
) -> tuple[Path, Path]:
    """Write the blind sheet and its key; returns (sheet path, key path).

    Args:
        sheet: where to write the sheet (CSV).
        prompts: the user prompt of each example (as the reviewer should read it).
        fine_tuned: the fine-tuned model's answers.
        baseline: the baseline's answers (same order).
        baseline_name: what the baseline is (kept in the key, not the sheet).
        seed: decides which side each fine-tuned answer lands on.
        key: where to write the key (default: ``key_path_for(sheet)``).
    """
    sheet = Path(sheet)
    key = Path(key) if key else key_path_for(sheet)
    if sheet.resolve() == key.resolve():
        raise TuneforgeError(f"{sheet}: the key file must be a different file from the sheet")
    if not sheet.parent.is_dir():
        raise TuneforgeError(f"{sheet.parent}: folder for the review sheet does not exist")
    rng = random.Random(seed)
    sheet_rows, key_rows = [], []
    for i, (p, ft, base) in enumerate(zip(prompts, fine_tuned, baseline, strict=True), 1):
        side = rng.choice("AB")
        a, b = (ft, base) if side == "A" else (base, ft)
        sheet_rows.append([str(i), p, a, b, "", ""])
        key_rows.append([str(i), side, baseline_name, _checksum(p, a, b)])
    _write_csv_atomic(key, KEY_COLUMNS, key_rows)
    _write_csv_atomic(sheet, SHEET_COLUMNS, sheet_rows)
    return sheet, key


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Worked example: 14 wins out of 20 -> p = 0.7, z^2/n = 0.19207; centre (0.7 + 0.09604) /
    1.19207 = 0.66778, half-width 1.96 * sqrt(0.0105 + 0.0024010) / 1.19207 = 0.18675, so
    (0.4810, 0.8545).
    """
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _read_csv(path: Path, columns: tuple[str, ...], what: str) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise TuneforgeError(f"{path}: {what} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TuneforgeError(
            f"{path}: not a UTF-8 text file; save the {what} as UTF-8 CSV"
        ) from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise TuneforgeError(f"{path}:1: the {what} has no '{missing[0]}' column")
    rows = []
    for row in reader:
        rows.append((reader.line_num, row))
    return rows


def parse_rating(value: str | None) -> str | None:
    """'A' / 'B' / 'tie' (several spellings) -> 'A' | 'B' | 'tie'; blank -> None; else ValueError."""
    v = (value or "").strip().lower()
    if not v:
        return None
    if v in ("a", "b"):
        return v.upper()
    if v in TIE_WORDS:
        return "tie"
    raise ValueError(value)


def score_review_sheet(sheet: str | Path, key: str | Path | None = None) -> dict:
    """Join a filled-in sheet with its key; count wins, losses and ties of the fine-tuned model.

    Returns:
        dict with wins, losses, ties, unrated, win_rate (wins / decisive ratings), ci95 (Wilson),
        win_rate_ties_half ((wins + ties / 2) / rated), baseline and a plain ``text``.

    Raises:
        TuneforgeError: missing file or column, an unknown rating, an id not in the key, or
            answers that differ from those the key was written for (sheet:line named).
    """
    sheet = Path(sheet)
    key = Path(key) if key else key_path_for(sheet)
    keys = {}
    for line, row in _read_csv(key, KEY_COLUMNS, "review key file"):
        if row["fine_tuned_side"] not in ("A", "B"):
            raise TuneforgeError(f"{key}:{line}: fine_tuned_side must be A or B")
        keys[row["id"]] = row
    wins = losses = ties = unrated = 0
    seen = set()
    baselines = set()
    for line, row in _read_csv(sheet, SHEET_COLUMNS, "review sheet"):
        k = keys.get(row["id"])
        if k is None:
            raise TuneforgeError(f"{sheet}:{line}: id {row['id']!r} is not in the key file {key}")
        if row["id"] in seen:
            raise TuneforgeError(f"{sheet}:{line}: id {row['id']!r} appears twice")
        seen.add(row["id"])
        if _checksum(row["prompt"], row["answer_a"], row["answer_b"]) != k["checksum"]:
            raise TuneforgeError(
                f"{sheet}:{line}: prompt or answers differ from the ones the key {key} was "
                "written for; rate the sheet as it was written"
            )
        try:
            rating = parse_rating(row["rating"])
        except ValueError:
            raise TuneforgeError(
                f"{sheet}:{line}: rating {row['rating']!r} is not A, B or tie (leave blank to skip)"
            ) from None
        baselines.add(k["baseline"])
        if rating is None:
            unrated += 1
        elif rating == "tie":
            ties += 1
        elif rating == k["fine_tuned_side"]:
            wins += 1
        else:
            losses += 1
    decisive, rated = wins + losses, wins + losses + ties
    lo, hi = wilson_interval(wins, decisive)
    result = {
        "sheet": str(sheet),
        "baseline": ", ".join(sorted(baselines)),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "unrated": unrated,
        "win_rate": wins / decisive if decisive else None,
        "ci95": [lo, hi] if decisive else None,
        "win_rate_ties_half": (wins + ties / 2) / rated if rated else None,
    }
    result["text"] = describe_review(result)
    return result


def describe_review(r: dict) -> str:
    """A plain sentence about a scored review."""
    decisive = r["wins"] + r["losses"]
    if not decisive:
        return (
            f"No decisive rating yet ({r['ties']} ties, {r['unrated']} unrated): "
            "fill the rating column with A, B or tie."
        )
    lo, hi = r["ci95"]
    return (
        f"Reviewers preferred the fine-tuned model over {r['baseline']} in {r['wins']} of "
        f"{decisive} decisive comparisons: win rate {100 * r['win_rate']:.1f}% "
        f"(95% Wilson CI {100 * lo:.1f}-{100 * hi:.1f}%); {r['ties']} ties, "
        f"{r['unrated']} unrated."
    )
