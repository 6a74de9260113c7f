"""The checkable property of the "answer format" task, and a rule-based reward built on it.

``has_property``: the response is one short line ``Answer: <answer>`` (at most 8 words).
``score`` is usable as ``training.reward_function: examples/prefs/reward.py:score`` for PPO.
"""

MAX_WORDS = 8


def has_property(response: str) -> bool:
    """True when the response is a single line starting 'Answer:' of at most MAX_WORDS words."""
    text = response.strip()
    return text.startswith("Answer:") and "\n" not in text and len(text.split()) <= MAX_WORDS


def score(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for the preferred format, 0.5 for the prefix alone, 0 otherwise (one per response)."""
    return [
        1.0 if has_property(r) else 0.5 if r.strip().startswith("Answer:") else 0.0
        for r in responses
    ]
