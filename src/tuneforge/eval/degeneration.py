"""What "intact as a language model" is measured by, for ``tuneforge eval`` of preference and RL
runs (eval/preference.py) and for the guards at each evaluation during training
(train/guards.py): answers that repeat themselves, leave the prompt's script, or never reach an end
of turn, their length, and the KL to the starting model on the answers. ``LIMITS`` are the largest
rises over the starting model that still count as intact."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch

from tuneforge.train.policy import labelled_logprobs

# the guards of "intact as a language model": (measure, largest allowed rise over the starting
# model, in the measure's own unit)
LIMITS = {
    "perplexity_change": 0.10,  # general-text perplexity, relative (+10%)
    "repetitive": 0.10,  # share of answers that repeat themselves, +10 points
    "off_script": 0.05,  # share of answers mostly outside the prompt's script, +5 points
    "unfinished": 0.20,  # share of answers cut at max_new_tokens, +20 points
}


# -- the measures --------------------------------------------------------------------------
def repetition(text: str, n: int = 3) -> float:
    """Share of an answer's word n-grams that repeat an earlier one (0 for fewer than 4)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 4:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def scripts(text: str) -> set[str]:
    """The scripts of the letters in ``text`` (LATIN, CJK, CYRILLIC, ...), by Unicode name."""
    out = set()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            out.add(name.split(" ")[0] if name else "UNKNOWN")
    return out


def off_script_share(text: str, allowed: set[str]) -> float:
    """Share of the letters of ``text`` whose script is not in ``allowed``."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    return sum(not (scripts(ch) <= allowed) for ch in letters) / len(letters)


@dataclass
class Degeneration:
    """Shares of answers (0..1) and their mean length in tokens."""

    repetitive: float  # more than a quarter of their word 3-grams repeat
    off_script: float  # more than a tenth of their letters outside the prompt's scripts
    unfinished: float  # reached max_new_tokens without an end of turn
    mean_tokens: float


def token_counts(answers: list[str], tokenizer) -> list[int]:
    return [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]


def ended(tokens: int, max_new_tokens: int) -> bool:
    """An answer of ``tokens`` tokens ended by itself (it stopped before the limit)."""
    return tokens < max_new_tokens


def degeneration(prompts, answers: list[str], tokenizer, max_new_tokens: int) -> Degeneration:
    n = max(len(answers), 1)
    tokens = token_counts(answers, tokenizer)
    off = 0
    for p, a in zip(prompts, answers, strict=True):
        allowed = scripts(" ".join(m["content"] for m in p)) or {"LATIN"}
        off += off_script_share(a, allowed) > 0.1
    return Degeneration(
        repetitive=sum(repetition(a) > 0.25 for a in answers) / n,
        off_script=off / n,
        unfinished=sum(not ended(t, max_new_tokens) for t in tokens) / n,
        mean_tokens=sum(tokens) / n,
    )


def reply_rows(tokenizer, prompts, answers: list[str], finished: list[bool]) -> list:
    """Each answer rendered after its prompt as training renders replies, labelled; the end of
    turn is labelled only where the answer reached it (an answer cut at the token limit did not)."""
    from tuneforge.data.render import IGNORE, end_of_turn_ids, render_reply

    stop = set(end_of_turn_ids(tokenizer))
    rows = []
    for p, a, done in zip(prompts, answers, finished, strict=True):
        row = render_reply(tokenizer, p, a)[0]
        if not done:
            labelled = [i for i, x in enumerate(row.labels) if x != IGNORE]
            while labelled and row.labels[labelled[-1]] in stop:
                row.labels[labelled.pop()] = IGNORE
        rows.append(row)
    return rows


def finished_answers(answers: list[str], tokenizer, max_new_tokens: int) -> list[bool]:
    """Whether each answer ended before ``max_new_tokens``."""
    return [ended(t, max_new_tokens) for t in token_counts(answers, tokenizer)]


@torch.no_grad()
def answer_logps(
    model, tokenizer, prompts, answers: list[str], finished: list[bool], batch_size: int = 8
) -> list[float]:
    """Each answer's summed log-prob under ``model`` (``reply_rows``)."""
    from tuneforge.data.preference import pad_rows

    device = next(model.parameters()).device
    rows = reply_rows(tokenizer, prompts, answers, finished)
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in pad_rows(rows[i : i + batch_size], 0).items()}
        out += labelled_logprobs(model, batch).sum(-1).tolist()
    return out


def mean_kl(tuned: list[float], start: list[float]) -> float:
    """Mean over answers of ``log p_tuned - log p_start``: on answers sampled from the fine-tuned
    model, the Monte Carlo estimate of KL(fine-tuned || start) per answer, in nats."""
    return sum(a - b for a, b in zip(tuned, start, strict=True)) / max(len(tuned), 1)


def sampled_answers(model, tokenizer, prompts, max_new_tokens: int, seed: int) -> list[str]:
    """Answers sampled at temperature 1 (what a KL estimate needs), seeded; the global random
    state is left as it was (training's data order and dropout do not move)."""
    from tuneforge.infer.generate import generate

    with torch.random.fork_rng():
        return generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
            seed=seed, batch_size=len(prompts) or 1,
        )  # fmt: skip


def kl_to_start(
    tuned, start, tokenizer, prompts, max_new_tokens: int, seed: int = 0, batch_size: int = 8
) -> float:
    """KL(fine-tuned || start) per answer, on answers sampled from ``tuned``. ``start`` is the
    starting model, or a function that returns a context in which ``tuned`` computes as it (an
    adapter disabled)."""
    answers = sampled_answers(tuned, tokenizer, prompts, max_new_tokens, seed)
    finished = finished_answers(answers, tokenizer, max_new_tokens)
    args = (tokenizer, prompts, answers, finished, batch_size)
    logps = answer_logps(tuned, *args)
    if isinstance(start, torch.nn.Module):
        return mean_kl(logps, answer_logps(start, *args))
    with start():
        return mean_kl(logps, answer_logps(tuned, *args))
