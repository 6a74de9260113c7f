"""Loss-based measures: eval loss on reference answers, and perplexity on general text.

The eval loss is the training objective's own number (mean cross-entropy over assistant tokens,
through the same rendering and loss code as training), so it lines up with the ``eval_loss`` in
metrics.jsonl. General-text perplexity is measured on plain text with no chat template: it asks
how much of the model's language modelling survived fine-tuning (forgetting).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.data.batching import iterate_eval, supervised_tokens
from tuneforge.data.io import read_records
from tuneforge.data.render import Sample, render_dataset
from tuneforge.errors import TuneforgeError
from tuneforge.eval.metrics import perplexity
from tuneforge.train.sft import SFTObjective

# The general text set shipped with the project (made by examples/general/make_general.py).
BUILTIN_GENERAL_TEXT = (
    Path(__file__).resolve().parents[3] / "examples" / "general" / "general_text.jsonl"
)


@dataclass
class LossResult:
    """Summed token NLL and its token count; ``loss`` and ``perplexity`` derive from them."""

    nll_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll_sum, self.tokens)


@torch.no_grad()
def samples_nll(model, samples: list[Sample], pad_id: int, batch_size: int = 8) -> LossResult:
    """Summed next-token NLL over the supervised positions of ``samples`` (training's loss)."""
    model.eval()
    device = next(model.parameters()).device
    objective = SFTObjective()
    total, tokens = 0.0, 0
    for batch in iterate_eval(samples, batch_size, pad_id):
        tokens += supervised_tokens(batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        total += float(objective.loss_sum(model, batch))
    return LossResult(total, tokens)


def answer_samples(tokenizer, conversations: list[list[dict]], max_length: int) -> list[Sample]:
    """Render full conversations (prompt + reference answer) with labels on the answer."""
    samples, _ = render_dataset(
        tokenizer, conversations, [str(i) for i in range(len(conversations))], max_length
    )
    return samples


def text_samples(tokenizer, texts: list[str], max_length: int) -> list[Sample]:
    """Plain text -> samples with every token a target, cut into windows of ``max_length``."""
    samples = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), max_length):
            window = ids[start : start + max_length]
            if len(window) >= 2:
                samples.append(Sample(window, list(window)))
    return samples


def resolve_general_text(setting: str) -> Path | None:
    """'builtin' -> the shipped set, 'none' -> None, else the user's file (must exist)."""
    if setting == "none":
        return None
    path = BUILTIN_GENERAL_TEXT if setting == "builtin" else Path(setting)
    if not path.is_file():
        if setting == "builtin":
            raise TuneforgeError(
                f"{path}: the built-in general text set is missing; set eval.general_text to a "
                'file of {"text": ...} records, or to none'
            )
        raise TuneforgeError(f"{path}: eval.general_text file not found")
    return path


def read_texts(path: str | Path) -> list[str]:
    """The ``text`` field of every record of a data file.

    Raises:
        TuneforgeError: a record without a non-empty string ``text`` (file:line named).
    """
    texts = []
    for rec in read_records(path):
        value = rec.data.get("text")
        if not isinstance(value, str) or not value.strip():
            raise rec.error(
                "'text' is missing or empty (general text records look like {\"text\": ...})"
            )
        texts.append(value)
    return texts
