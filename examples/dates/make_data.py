"""Make the dates task: rewrite a date written in English into ISO 8601 (YYYY-MM-DD).

A single-task dataset with an exactly checkable answer, so exact match measures learning.
Deterministic: ``python examples/dates/make_data.py`` rewrites the same files (and
prompts-train / prompts-eval.jsonl, the same examples as GRPO prompt records).
"""

import datetime as dt
import json
import random
from pathlib import Path

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
INSTRUCTIONS = [
    "Convert this date to ISO 8601 format (YYYY-MM-DD).",
    "Rewrite the date as YYYY-MM-DD.",
    "Give this date in ISO format.",
    "Normalize the following date to YYYY-MM-DD.",
]


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def spell(d: dt.date, style: int) -> str:
    month, short = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    return [
        f"{month} {d.day}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"{short} {d.day}, {d.year}",
        f"the {ordinal(d.day)} of {month}, {d.year}",
        f"{d.strftime('%A')}, {month} {d.day}, {d.year}",
        f"{month} {ordinal(d.day)} {d.year}",
        f"{d.day:02d} {short} {d.year}",
    ][style]


def make(n: int, rng: random.Random, used: set) -> list[dict]:
    rows = []
    while len(rows) < n:
        d = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(365 * 100))
        if d in used:
            continue
        used.add(d)
        rows.append(
            {
                "instruction": rng.choice(INSTRUCTIONS),
                "input": spell(d, rng.randrange(7)),
                "output": d.isoformat(),
            }
        )
    return rows


def as_prompt(row: dict) -> dict:
    """The same example as a prompt record for GRPO (configs/grpo.yaml): the user message SFT
    renders from it (instruction, blank line, input) and the answer a reward checks."""
    return {"prompt": f"{row['instruction']}\n\n{row['input']}", "answer": row["output"]}


def main() -> None:
    rng = random.Random(1234)
    used: set = set()
    here = Path(__file__).parent
    for name, n in (("train", 400), ("eval", 50), ("test", 100)):
        rows = make(n, rng, used)
        with open(here / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        if name != "test":  # test.jsonl stays the held-out set of the benches
            with open(here / f"prompts-{name}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(as_prompt(row)) + "\n")


if __name__ == "__main__":
    main()
