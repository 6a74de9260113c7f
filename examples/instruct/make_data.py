"""Make a mixed instruction dataset of realistic, varied lengths (about 64-512 tokens per sample).

Eight everyday text tasks whose answers follow from the input (sorting, extraction, formatting,
counting, rewriting), with inputs from one sentence to several paragraphs, so sample lengths
spread the way real instruction data does. Used by the speed benchmark (bench/sft_bench.py).
Deterministic: ``python examples/instruct/make_data.py`` rewrites the same files.
"""

import json
import random
from pathlib import Path

WORDS = (
    "river market garden winter engine signal harbor pencil window thunder forest candle "
    "ladder orbit meadow copper velvet anchor bridge canyon desert falcon glacier island "
    "jungle kettle lantern marble needle oyster pepper quarry saddle timber umbrella valley "
    "wagon yacht zephyr basket cactus dolphin ember feather granite hammer igloo jacket "
    "kitten lemon mirror nectar orchard pillow quiver ribbon silver tunnel violin walnut"
).split()
NAMES = (
    "Ava Ben Chloe Diego Elena Farid Grace Hiro Ines Jonas Kira Liam Maya Noor Omar Priya".split()
)
CITIES = "Lisbon Oslo Lima Nairobi Seoul Quito Dakar Hanoi Perth Tunis Riga Kyoto".split()
VERBS = "builds repairs designs paints measures collects studies sells delivers tests".split()


def sentence(rng: random.Random) -> str:
    a, b = rng.sample(WORDS, 2)
    return f"{rng.choice(NAMES)} {rng.choice(VERBS)} a {a} near the {b} in {rng.choice(CITIES)}."


def paragraph(rng: random.Random, n: int) -> str:
    return " ".join(sentence(rng) for _ in range(n))


def task_sort(rng):
    words = rng.sample(WORDS, rng.randint(5, 40))
    return (
        "Sort these words alphabetically and list them separated by commas.",
        ", ".join(words),
        ", ".join(sorted(words)),
    )


def task_names(rng):
    text = paragraph(rng, rng.randint(2, 14))
    names = sorted({w.strip(".,") for w in text.split() if w.strip(".,") in NAMES})
    return (
        "List every person's name mentioned in the text, alphabetically, one per line.",
        text,
        "\n".join(names),
    )


def task_json(rng):
    people = rng.sample(NAMES, rng.randint(2, 10))
    lines = [f"{p}: {rng.randint(18, 90)} years, lives in {rng.choice(CITIES)}" for p in people]
    records = []
    for line in lines:
        name, rest = line.split(": ")
        age, city = rest.split(" years, lives in ")
        records.append({"name": name, "age": int(age), "city": city})
    return (
        "Convert these records to a JSON list of objects with keys name, age and city.",
        "\n".join(lines),
        json.dumps(records, indent=1),
    )


def task_count(rng):
    text = paragraph(rng, rng.randint(1, 12))
    word = rng.choice(CITIES)
    return (
        f"How many times does the word '{word}' appear in the text? Answer with the number "
        "and the sentences that contain it.",
        text,
        f"{text.count(word)}\n" + "\n".join(s + "." for s in text.split(".") if word in s),
    )


def task_upper(rng):
    text = paragraph(rng, rng.randint(1, 6))
    return ("Rewrite the text in capital letters.", text, text.upper())


def task_reverse(rng):
    items = [sentence(rng) for _ in range(rng.randint(2, 10))]
    numbered = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(items))
    return (
        "Reverse the order of this numbered list and renumber it.",
        numbered,
        "\n".join(f"{i + 1}. {s}" for i, s in enumerate(reversed(items))),
    )


def task_table(rng):
    rows = [
        (p, rng.choice(CITIES), rng.randint(1, 500)) for p in rng.sample(NAMES, rng.randint(2, 12))
    ]
    table = "| name | city | orders |\n| --- | --- | --- |\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows
    )
    return (
        "Convert this Markdown table to CSV with a header row.",
        table,
        "name,city,orders\n" + "\n".join(f"{a},{b},{c}" for a, b, c in rows),
    )


def task_total(rng):
    rows = [(rng.choice(WORDS), rng.randint(1, 99)) for _ in range(rng.randint(2, 16))]
    text = "\n".join(f"{w}: {n} units" for w, n in rows)
    return (
        "Add up the units and show the running total after each line, then the total.",
        text,
        "\n".join(f"{w}: {sum(n for _, n in rows[: i + 1])}" for i, (w, _) in enumerate(rows))
        + f"\nTotal: {sum(n for _, n in rows)}",
    )


TASKS = [
    task_sort,
    task_names,
    task_json,
    task_count,
    task_upper,
    task_reverse,
    task_table,
    task_total,
]


def main() -> None:
    rng = random.Random(2024)
    here = Path(__file__).parent
    for name, n in (("train", 400), ("eval", 50)):
        with open(here / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                instruction, inp, out = rng.choice(TASKS)(rng)
                f.write(
                    json.dumps({"instruction": instruction, "input": inp, "output": out}) + "\n"
                )


if __name__ == "__main__":
    main()
