"""``tuneforge data augment``: more training records from few, against overfitting.

Two kinds of variant, both rewriting only what the model is asked (the instruction, the user
turns, a preference prompt), never an expected output and never an instruction record's
``input`` (it holds the values the answer depends on):

- ``paraphrase``: the instruction / user turn rewritten by a model (default: the base model, with
  its own chat template, through ``eval.generate``). A rewrite that is empty, unchanged, much shorter
  or longer than the original, adds lines, shares too few of its words, or contains the expected
  output is rejected (``accept_paraphrase``), and a noise variant takes its place (counted).
- ``noise``: light rule-based noise: word dropout and swaps of neighbouring words, seeded per
  record. Words with digits are never dropped (they usually carry the values of the task).

With ``--factor K`` each original is followed by K - 1 variants (alternating paraphrase and noise
with ``--mode both``). Variants are tagged ``"augmented": true``, ``"augmented_from": SOURCE``,
``"augmentation": KIND`` and ``"augmented_origin"`` (a key of the original's normalised text) so
``split`` and ``train`` can keep them, and their originals, out of eval data.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.data.fields import (
    get_path,
    map_texts,
    record_text,
    response_text,
    user_slots,
    with_paths,
)
from tuneforge.data.io import Record
from tuneforge.data.records import detect_format
from tuneforge.datatools.quality import clean_text, exact_key, normalize_for_match
from tuneforge.datatools.stream import atomic_output, dumps, read_stream
from tuneforge.errors import TuneforgeError

TAGS = ("augmented", "augmented_from", "augmentation", "augmented_origin")
MODES = ("both", "paraphrase", "noise")
# A system message and two worked examples: small chat models answer a bare "rewrite this"
# request far more often than they rewrite it.
PARAPHRASE_SYSTEM = (
    "You rewrite requests in other words. Keep the meaning and every detail. Reply with the "
    "rewritten request only, and never answer it."
)
PARAPHRASE_SHOTS = (
    ("Translate the sentence below into French.", "Put the following sentence into French."),
    ("List three uses of baking soda.", "Name three things baking soda can be used for."),
)
_LEAD_IN = re.compile(r"^[^\n]{0,80}:[ \t]*\n+")  # "Here is a rewritten version:\n\n..."
_LABEL = re.compile(r"^(?:\w+[ \t]?){1,3}:[ \t]+")  # "Rewrite: ...", "Rephrased request: ..."
_DIGIT = re.compile(r"\d")
_WORD = re.compile(r"\w+")


def is_augmented(data: dict) -> bool:
    return bool(data.get("augmented"))


def origin_key(data: dict) -> str:
    """A key of a record's normalised text, the same for the original and after ``clean``."""
    base = {k: v for k, v in data.items() if k not in TAGS}
    fmt = detect_format(base)
    if fmt is not None:
        base = map_texts(base, fmt, clean_text)
    return f"{exact_key(record_text(base, fmt)):016x}"


def noise_text(text: str, rng: random.Random, p: float = 0.1) -> str:
    """Word dropout (probability ``p``, never a word with a digit, never every word) and swaps of
    neighbouring words (probability ``p`` per pair); line breaks are kept."""
    out_lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        kept = [w for w in words if not w or _DIGIT.search(w) or rng.random() >= p]
        if not any(w.strip() for w in kept):
            kept = words
        i = 0
        while i < len(kept) - 1:
            if kept[i].strip() and kept[i + 1].strip() and rng.random() < p:
                kept[i], kept[i + 1] = kept[i + 1], kept[i]
                i += 2
            else:
                i += 1
        out_lines.append(" ".join(kept))
    return "\n".join(out_lines)


def forced_noise(text: str, rng: random.Random, p: float) -> str | None:
    """``noise_text``, retried a few times if it left the text unchanged; None if it always did."""
    for _ in range(8):
        noisy = noise_text(text, rng, p)
        if noisy != text:
            return noisy
        p = min(0.5, p * 2)
    return None


class Paraphraser:
    """Rewrites requests with a chat model (sampling, seeded) through ``eval.generate``."""

    def __init__(
        self,
        model,
        tokenizer,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int = 0,
        batch_size: int = 16,
        max_new_tokens: int = 256,
    ):
        from tuneforge.data.render import ensure_chat_template

        ensure_chat_template(tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.calls = 0

    @classmethod
    def load(cls, ref: str, **kwargs) -> Paraphraser:
        """A paraphraser from a model reference or a run folder."""
        from tuneforge.infer.runs import load_for_inference

        model, tokenizer = load_for_inference(ref)
        return cls(model, tokenizer, **kwargs)

    def __call__(self, texts: list[str]) -> list[str]:
        """One rewrite per text (raw, labels and quotes stripped)."""
        from tuneforge.infer.generate import generate

        out = [""] * len(texts)
        lengths = [len(self.tokenizer(t)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            budget = min(self.max_new_tokens, 2 * max(lengths[i] for i in idx) + 16)
            convs = [paraphrase_conversation(texts[i]) for i in idx]
            replies = generate(
                self.model,
                self.tokenizer,
                convs,
                max_new_tokens=budget,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed + self.calls,
                batch_size=self.batch_size,
            )
            self.calls += 1
            for i, reply in zip(idx, replies, strict=True):
                out[i] = _strip_label(reply)
        return out


def paraphrase_conversation(text: str) -> list[dict]:
    """The chat the paraphrasing model is given for one request."""
    conv = [{"role": "system", "content": PARAPHRASE_SYSTEM}]
    for request, rewrite in PARAPHRASE_SHOTS:
        conv += [
            {"role": "user", "content": f"Rewrite: {request}"},
            {"role": "assistant", "content": rewrite},
        ]
    return conv + [{"role": "user", "content": f"Rewrite: {text}"}]


def _strip_label(reply: str) -> str:
    text = reply.strip()
    text = _LEAD_IN.sub("", text, count=1)
    text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def accept_paraphrase(original: str, candidate: str, expected: str) -> tuple[bool, str]:
    """Whether a model's rewrite may stand in for ``original`` (and why not)."""
    cand = normalize_for_match(candidate)
    if not cand:
        return False, "empty"
    if cand == normalize_for_match(original):
        return False, "unchanged"
    if len(candidate) > 2 * len(original) + 40:
        return False, "too long"
    if candidate.count("\n") > original.count("\n"):
        return False, "adds lines"
    answer = normalize_for_match(expected)
    if len(answer) >= 4 and answer in cand:
        return False, "contains the expected output"
    words = _WORD.findall(normalize_for_match(original))
    cand_words = _WORD.findall(cand)
    if len(cand_words) < 0.5 * len(words):
        return False, "too short"
    if words and len(set(words) & set(cand_words)) < 0.3 * len(set(words)):
        return False, "drifted from the original"
    return True, ""


@dataclass
class AugmentOptions:
    factor: int = 2
    mode: str = "both"
    noise: float = 0.1
    seed: int = 0
    chunk: int = 32  # records per paraphrasing round (memory stays flat)


@dataclass
class AugmentReport:
    records: int = 0
    variants: Counter = field(default_factory=Counter)  # kind -> count
    rejected: Counter = field(default_factory=Counter)  # why a paraphrase was replaced by noise
    skipped: Counter = field(default_factory=Counter)  # why a record got no variant


def _kinds(opts: AugmentOptions) -> list[str]:
    if opts.mode == "both":
        return ["paraphrase" if v % 2 == 1 else "noise" for v in range(1, opts.factor)]
    return [opts.mode] * (opts.factor - 1)


def _augment_chunk(
    chunk: list[Record], opts: AugmentOptions, paraphraser, report: AugmentReport
) -> Iterator[dict]:
    kinds = _kinds(opts)
    requests: list[tuple[int, int, tuple]] = []  # (record, variant, slot)
    texts: list[str] = []
    plans = []
    for r, rec in enumerate(chunk):
        fmt = detect_format(rec.data)
        slots = user_slots(rec.data, fmt) if fmt and not is_augmented(rec.data) else []
        plans.append((fmt, slots))
        if paraphraser is None or not slots:
            continue
        for v, kind in enumerate(kinds):
            if kind == "paraphrase":
                for slot in slots:
                    requests.append((r, v, slot))
                    texts.append(get_path(rec.data, slot))
    rewrites = dict(zip(requests, paraphraser(texts), strict=True)) if texts else {}
    for r, rec in enumerate(chunk):
        report.records += 1
        yield rec.data
        fmt, slots = plans[r]
        if not slots:
            why = (
                "already augmented"
                if is_augmented(rec.data)
                else f"nothing to rewrite ({fmt or 'unknown'} record)"
            )
            report.skipped[why] += 1
            continue
        expected = response_text(rec.data, fmt)
        seen = {normalize_for_match(record_text(rec.data, fmt))}
        for v, kind in enumerate(kinds):
            rng = random.Random(f"{opts.seed}:{rec.source}:{v}")
            values = {}
            if kind == "paraphrase":
                for slot in slots:
                    ok, why = accept_paraphrase(
                        get_path(rec.data, slot), rewrites[(r, v, slot)], expected
                    )
                    if not ok:
                        report.rejected[why] += 1
                        values = {}
                        kind = "noise"
                        break
                    values[slot] = rewrites[(r, v, slot)]
            if kind == "noise":
                for slot in slots:
                    noisy = forced_noise(get_path(rec.data, slot), rng, opts.noise)
                    if noisy is not None:
                        values[slot] = noisy
            variant = with_paths(rec.data, values)
            text = normalize_for_match(record_text(variant, fmt))
            if not values or text in seen:
                report.skipped["variant identical to the original or another variant"] += 1
                continue
            seen.add(text)
            variant.update(
                augmented=True,
                augmented_from=rec.source,
                augmentation=kind,
                augmented_origin=origin_key(rec.data),
            )
            report.variants[kind] += 1
            yield variant


def augment_records(
    records: Iterable[Record],
    opts: AugmentOptions,
    paraphraser=None,
    report: AugmentReport | None = None,
) -> Iterator[dict]:
    """Each record followed by its variants, in chunks of ``opts.chunk`` records.

    Args:
        records: the originals.
        opts: factor, mode, noise probability, seed.
        paraphraser: a callable list[str] -> list[str] (a ``Paraphraser``); needed unless the
            mode is ``noise``.
    """
    if opts.factor < 2:
        raise TuneforgeError(
            f"--factor must be at least 2 (the originals plus variants), got {opts.factor}"
        )
    if opts.mode not in MODES:
        raise TuneforgeError(f"--mode must be one of {', '.join(MODES)}, got {opts.mode!r}")
    if not 0 < opts.noise < 1:
        raise TuneforgeError(f"the noise probability must be in (0, 1), got {opts.noise}")
    if opts.mode != "noise" and paraphraser is None:
        raise TuneforgeError("paraphrasing needs a model")
    report = report if report is not None else AugmentReport()
    chunk: list[Record] = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) == opts.chunk:
            yield from _augment_chunk(chunk, opts, paraphraser, report)
            chunk = []
    if chunk:
        yield from _augment_chunk(chunk, opts, paraphraser, report)


def augment_file(
    path: str | Path, out: str | Path, opts: AugmentOptions, paraphraser=None
) -> AugmentReport:
    """Stream ``path`` through ``augment_records`` into ``out`` (written only on success)."""
    report = AugmentReport()
    with atomic_output(out, inputs=(path,)) as f:
        for data in augment_records(read_stream(path), opts, paraphraser, report):
            f.write(dumps(data))
    return report
