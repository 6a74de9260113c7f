"""Config -> rendered training and eval samples (the one sample path every objective uses)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.config import DataConfig
from tuneforge.data.io import read_records
from tuneforge.data.records import Messages, to_messages
from tuneforge.data.render import RenderStats, Sample, ensure_chat_template, render_dataset
from tuneforge.errors import TuneforgeError


@dataclass
class PreparedData:
    train: list[Sample]
    eval: list[Sample]
    train_stats: RenderStats
    eval_stats: RenderStats = field(default_factory=RenderStats)


def load_conversations(
    path: str, fmt: str = "auto", system_prompt: str | None = None
) -> tuple[list[Messages], list[str]]:
    """Read and validate a data file; returns messages per record and each record's source."""
    records = read_records(path)
    return [to_messages(r, fmt, system_prompt) for r in records], [r.source for r in records]


def prepare_sft_data(cfg: DataConfig, tokenizer, seed: int, model=None) -> PreparedData:
    """Read, validate and render train (and eval) data for supervised fine-tuning.

    The configured data steps (clean, dedup, eval split, augment, mix) run first; see
    ``data.pipeline``. ``model`` is needed only for ``data.augment`` paraphrases.

    Raises:
        TuneforgeError: bad records, or no sample left with supervised tokens.
    """
    from tuneforge.data.pipeline import prepare_conversations

    ensure_chat_template(tokenizer)
    conv = prepare_conversations(cfg, seed, model=model, tokenizer=tokenizer)
    convs, sources = conv.train, conv.train_sources
    eval_convs, eval_sources = conv.eval, conv.eval_sources
    train, train_stats = render_dataset(tokenizer, convs, sources, cfg.max_length)
    if not train:
        raise TuneforgeError(
            f"{cfg.train}: no training sample keeps a supervised token within "
            f"data.max_length={cfg.max_length}; raise data.max_length"
        )
    evals, eval_stats = render_dataset(tokenizer, eval_convs, eval_sources, cfg.max_length)
    return PreparedData(train, evals, train_stats, eval_stats)
