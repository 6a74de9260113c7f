"""KTO's records: single completions labelled desirable or not, ``{prompt, completion, label}``,
or preference pairs, each read as two such examples.

``label`` must be a JSON boolean (``true`` / ``false``); a CSV cell ``true`` / ``false`` reads as
one. Each completion is rendered by the chat-template code pairs use (``render.render_reply``), so
its prompt tokens are what ``generate`` feeds the model. KTO's reference point pairs each prompt
with another example's completion (``collate_labelled``): the rows of those mismatched pairs are
built from the same tokens, with no second rendering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tuneforge.config import DataConfig
from tuneforge.data.io import Record
from tuneforge.data.preference import pad_rows, prompt_messages
from tuneforge.data.records import Messages
from tuneforge.data.render import IGNORE, Sample, ensure_chat_template, render_reply
from tuneforge.errors import TuneforgeError

NEEDS = "kto records need 'prompt', 'completion' and a boolean 'label' (or a preference pair)"


@dataclass
class Labelled:
    """One validated KTO record."""

    prompt: Messages
    completion: str
    desirable: bool
    source: str


@dataclass
class LabelledSample:
    sample: Sample
    prompt_length: int
    desirable: bool
    source: str
    messages: list[dict] | None = None  # the prompt (generation guards answer it)

    def __len__(self) -> int:
        return len(self.sample)


@dataclass
class LabelledStats:
    rendered: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0  # the prompt alone fills max_length
    dropped_sources: list[str] = field(default_factory=list)


@dataclass
class PreparedLabelled:
    train: list[LabelledSample]
    eval: list[LabelledSample]
    train_stats: LabelledStats
    eval_stats: LabelledStats = field(default_factory=LabelledStats)


def to_labelled(rec: Record, system_prompt: str | None = None) -> Labelled:
    """Validate one KTO record.

    Raises:
        TuneforgeError: naming file, line and field.
    """
    prompt = prompt_messages(rec, system_prompt, NEEDS)
    completion = rec.data.get("completion")
    if isinstance(completion, list):  # conversational form, as TRL's
        if len(completion) != 1 or not isinstance(completion[0], dict):
            raise rec.error("'completion' as a list must hold exactly one assistant message")
        completion = completion[0].get("content")
    if completion is None:
        raise rec.error(f"'completion' is missing ({NEEDS})")
    if not isinstance(completion, str) or not completion.strip():
        raise rec.error("'completion' must be non-empty text")
    label = rec.data.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"  # a CSV cell
    if not isinstance(label, bool):
        got = "missing" if label is None else f"{label!r} ({type(label).__name__})"
        raise rec.error(
            f"'label' must be true (a desirable completion) or false (an undesirable one), "
            f"got {got}"
        )
    return Labelled(prompt, completion, label, rec.source)


def to_examples(rec: Record, system_prompt: str | None = None) -> list[Labelled]:
    """A KTO record -> one example; a preference record ``{prompt, chosen, rejected}`` -> two
    (chosen desirable, rejected undesirable: TRL's ``unpair_preference_dataset``)."""
    if "chosen" in rec.data and "completion" not in rec.data:
        from tuneforge.data.preference import to_preference

        pref = to_preference(rec, system_prompt)
        return [
            Labelled(pref.prompt, pref.chosen, True, rec.source),
            Labelled(pref.prompt, pref.rejected, False, rec.source),
        ]
    return [to_labelled(rec, system_prompt)]


def render_labelled(tokenizer, items: list[Labelled], max_length: int):
    """Render KTO records, cut to ``max_length``; returns ``(samples, LabelledStats)``."""
    stats = LabelledStats()
    out = []
    for item in items:
        sample, p = render_reply(tokenizer, item.prompt, item.completion)
        if p >= max_length:
            stats.dropped_no_labels += 1
            stats.dropped_sources.append(item.source)
            continue
        stats.truncated += len(sample) > max_length
        stats.rendered += 1
        cut = Sample(sample.input_ids[:max_length], sample.labels[:max_length])
        out.append(LabelledSample(cut, p, item.desirable, item.source, item.prompt))
    return out, stats


def prepare_labelled_data(cfg: DataConfig, tokenizer, seed: int) -> PreparedLabelled:
    """Read, validate and render train (and eval) KTO records after the shared data steps.

    Raises:
        TuneforgeError: bad records, no example left, or only one kind of label.
    """
    from tuneforge.data.pipeline import prepare_records, record_converter

    ensure_chat_template(tokenizer)
    prepared = prepare_records(cfg, seed, record_converter(cfg, "kto"), lambda xs: xs[0].prompt)
    flat = [x for xs in prepared.train for x in xs]
    train, stats = render_labelled(tokenizer, flat, cfg.max_length)
    if not train:
        raise TuneforgeError(
            f"{cfg.train}: no kto example has a completion token within "
            f"data.max_length={cfg.max_length}; raise data.max_length"
        )
    flat_eval = [x for xs in prepared.eval for x in xs]
    evals, eval_stats = render_labelled(tokenizer, flat_eval, cfg.max_length)
    return PreparedLabelled(train, evals, stats, eval_stats)


def collate_labelled(items: list[LabelledSample], pad_id: int, max_length: int):
    """Right-padded batch of 2B rows: the B examples, then B mismatched rows (prompt i with the
    completion of example i - 1, as TRL's KTO pairs them) for the reference point; ``desirable``
    (B,) holds the labels."""
    rows = [x.sample for x in items]
    for i, x in enumerate(items):
        other = items[i - 1]  # i = 0 takes the last one's
        p, q = x.prompt_length, other.prompt_length
        ids = (x.sample.input_ids[:p] + other.sample.input_ids[q:])[:max_length]
        labels = ([IGNORE] * p + other.sample.labels[q:])[:max_length]
        rows.append(Sample(ids, labels))
    batch = pad_rows(rows, pad_id)
    batch["desirable"] = torch.tensor([x.desirable for x in items], dtype=torch.bool)
    return batch
