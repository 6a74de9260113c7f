"""Make the "answer format" preference task: short factual questions whose preferred answer is
one short line in the form ``Answer: <answer>`` and whose rejected answer is chatty.

The preferred property is checkable by a program (``reward.has_property``), so alignment is
measured without humans. Files (deterministic: ``python examples/prefs/make_data.py``):

* ``sft.jsonl``      instruction records for the SFT stage: the task, with 36 of 120 answers (30%)
                     in the preferred format and the rest as "Sure! <sentence> <closer>" (SFT
                     teaches the task, preferences teach the format);
* ``train.jsonl``    preference pairs ``{prompt, chosen, rejected}`` (reward model, DPO; PPO
                     prompts);
* ``eval.jsonl``     held-out preference pairs (pairwise accuracy, eval loss);
* ``test.jsonl``     held-out prompts with their answers, used only to measure the property.

Every question appears in exactly one file. About 15% of rejected answers keep the prefix but
ramble, so the preference is about the whole format, not the first word.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna",
    "Hungary": "Budapest", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Cuba": "Havana", "Turkey": "Ankara", "Iran": "Tehran", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Australia": "Canberra",
    "Brazil": "Brasilia", "Colombia": "Bogota", "Morocco": "Rabat", "Ghana": "Accra",
    "Nigeria": "Abuja", "Iceland": "Reykjavik",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
    "early": "late", "full": "empty", "hard": "soft", "high": "low", "old": "new", "open": "closed",
    "rich": "poor", "strong": "weak", "thick": "thin", "wet": "dry", "loud": "quiet",
    "clean": "dirty", "long": "short", "heavy": "light", "near": "far", "first": "last",
    "young": "old", "win": "lose", "push": "pull", "inside": "outside", "day": "night",
    "left": "right", "buy": "sell", "begin": "end",
}  # fmt: skip
PLURALS = {
    "mouse": "mice", "child": "children", "goose": "geese", "foot": "feet", "tooth": "teeth",
    "man": "men", "woman": "women", "person": "people", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "box": "boxes", "city": "cities", "baby": "babies", "fish": "fish",
    "sheep": "sheep", "cactus": "cacti", "ox": "oxen", "bus": "buses", "potato": "potatoes",
}  # fmt: skip
COLORS = {
    "a banana": "yellow", "grass": "green", "the sky on a clear day": "blue", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
    "a flamingo": "pink", "milk": "white", "a carrot": "orange", "a crow": "black",
    "a lime": "green", "a strawberry": "red", "chocolate": "brown",
}  # fmt: skip
BABIES = {
    "dog": "puppy", "cat": "kitten", "cow": "calf", "horse": "foal", "sheep": "lamb",
    "goat": "kid", "bear": "cub", "duck": "duckling", "frog": "tadpole", "kangaroo": "joey",
    "swan": "cygnet", "deer": "fawn", "goose": "gosling", "pig": "piglet", "owl": "owlet",
}  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]  # fmt: skip

OPENERS = ["Great question! ", "Sure! ", "Of course. ", "Happy to help! ", ""]
CLOSERS = [
    " I hope this helps!",
    " Let me know if you have any other questions.",
    " It is a fun fact to remember.",
    " Feel free to ask me anything else.",
]


def questions(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, a full-sentence answer) for every question of the task."""
    q = []
    for country, city in CAPITALS.items():
        q.append(
            (f"What is the capital of {country}?", city, f"The capital of {country} is {city}.")
        )
    for word, opp in OPPOSITES.items():
        q.append(
            (f"What is the opposite of '{word}'?", opp, f"The opposite of '{word}' is '{opp}'.")
        )
    for word, plural in PLURALS.items():
        q.append(
            (f"What is the plural of '{word}'?", plural, f"The plural of '{word}' is '{plural}'.")
        )
    for thing, color in COLORS.items():
        q.append((f"What color is {thing}?", color, f"{thing[0].upper() + thing[1:]} is {color}."))
    for animal, baby in BABIES.items():
        q.append((f"What is a baby {animal} called?", baby, f"A baby {animal} is called a {baby}."))
    for i, day in enumerate(DAYS):
        nxt = DAYS[(i + 1) % 7]
        q.append((f"Which day comes after {day}?", nxt, f"The day after {day} is {nxt}."))
    for i, month in enumerate(MONTHS):
        nxt = MONTHS[(i + 1) % 12]
        q.append((f"Which month comes after {month}?", nxt, f"The month after {month} is {nxt}."))
    seen = set()
    while len(q) < 320:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        op = rng.choice(["plus", "minus", "times"])
        if (a, b, op) in seen or (op == "minus" and a < b):
            continue
        seen.add((a, b, op))
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        q.append((f"What is {a} {op} {b}?", str(value), f"{a} {op} {b} equals {value}."))
    rng.shuffle(q)
    return q


def preferred(answer: str) -> str:
    return f"Answer: {answer}"


def sft_style(sentence: str, rng: random.Random) -> str:
    """The SFT data's usual (not preferred) style: one opener, then a chatty sentence."""
    return f"Sure! {sentence}{rng.choice(CLOSERS)}"


def chatty(sentence: str, rng: random.Random) -> str:
    """A correct but chatty answer; sometimes with the prefix kept, so the format is the point."""
    if rng.random() < 0.15:
        return f"Answer: {sentence}{rng.choice(CLOSERS)}"
    return f"{rng.choice(OPENERS)}{sentence}{rng.choice(CLOSERS)}"


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).resolve().parent
    q = questions(rng)
    sft, train, evals, test = q[:120], q[120:240], q[240:280], q[280:320]
    rows = {
        "sft": [
            {
                "instruction": question,
                "output": preferred(a) if rng.random() < 0.25 else sft_style(s, rng),
            }
            for question, a, s in sft
        ],
        "train": [
            {"prompt": question, "chosen": preferred(a), "rejected": chatty(s, rng)}
            for question, a, s in train
        ],
        "eval": [
            {"prompt": question, "chosen": preferred(a), "rejected": chatty(s, rng)}
            for question, a, s in evals
        ],
        "test": [{"prompt": question, "answer": a} for question, a, _ in test],
    }
    for name, items in rows.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        print(f"{name}.jsonl: {len(items)} records")


if __name__ == "__main__":
    main()
