"""``tuneforge data stats``: size, token lengths, turns, duplicates and diversity of a data file.

Token lengths are those training sees: records are rendered with the model's chat template by the
same code as ``train`` (``render.render_messages``), so "longer than max_length" here is the number
``train`` truncates.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data.fields import as_text, prompt_text, record_text
from tuneforge.data.io import Record
from tuneforge.data.records import detect_format, to_messages
from tuneforge.data.render import render_messages
from tuneforge.datatools.quality import (
    DEFAULT_NGRAM,
    DEFAULT_THRESHOLD,
    Deduper,
    normalize_for_match,
)
from tuneforge.datatools.stream import read_stream
from tuneforge.datatools.validate import check_record
from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_path

_WORD = re.compile(r"\w+")


def load_stats_tokenizer(model: str):
    """The tokenizer of a model reference, with a chat template (a plain one for base models)."""
    from tuneforge.data.render import ensure_chat_template
    from tuneforge.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    ensure_chat_template(tokenizer)
    return tokenizer


def _as_messages(value: Any, role: str) -> list[dict]:
    if isinstance(value, list):
        return [m for m in value if isinstance(m, dict)]
    if isinstance(value, dict):
        return [value]
    return [{"role": role, "content": as_text(value)}]


def record_tokens(tokenizer, data: dict, fmt: str) -> int:
    """Tokens of one record as training renders it (preference: prompt + the longer reply).

    Raises:
        TuneforgeError: the record is not usable (see ``validate``).
    """
    if fmt in ("instruction", "chat"):
        sample = render_messages(tokenizer, to_messages(Record(data, "record"), fmt), 10**9)
        return len(sample) if sample is not None else 0
    if fmt == "preference":
        prompt = _as_messages(data.get("prompt"), "user")
        return max(
            len(render_messages(tokenizer, prompt + _as_messages(data.get(k), "assistant"), 10**9))
            for k in ("chosen", "rejected")
        )
    return len(tokenizer(as_text(data.get("text")))["input_ids"])


@dataclass
class DataStats:
    path: str
    format: str | None = None
    records: int = 0
    unusable: int = 0
    max_length: int = 512
    tokens: dict[str, float] = field(default_factory=dict)  # min, median, p95, max, mean
    over_max_length: int = 0
    turns: dict[str, float] = field(default_factory=dict)  # assistant turns per record
    exact_duplicates: int = 0
    duplicate_rate: float = 0.0
    distinct_1: float = 0.0
    distinct_2: float = 0.0
    near_duplicate_share: float = 0.0  # records in a cluster of 2+ (exact or near)
    clusters: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("lengths")
        return d


def _turns(data: dict, fmt: str) -> int:
    if fmt == "chat" and isinstance(data.get("messages"), list):
        return sum(
            1 for m in data["messages"] if isinstance(m, dict) and m.get("role") == "assistant"
        )
    if fmt == "preference" and isinstance(data.get("prompt"), list):
        return 1 + sum(
            1 for m in data["prompt"] if isinstance(m, dict) and m.get("role") == "assistant"
        )
    return 1


def compute_stats(
    path: str | Path,
    tokenizer=None,
    max_length: int = 512,
    threshold: float = DEFAULT_THRESHOLD,
    ngram: int = DEFAULT_NGRAM,
) -> DataStats:
    """Statistics of a data file, streamed (token lengths are kept, one int per record).

    Args:
        path: the data file.
        tokenizer: for token lengths (None: skip them).
        max_length: the length counted as too long (``data.max_length``).
        threshold: Jaccard similarity for near duplicates.
        ngram: words per shingle.
    """
    st = DataStats(str(path), max_length=max_length)
    unigrams: set[int] = set()
    bigrams: set[int] = set()
    n_uni = n_bi = 0
    turns: list[int] = []
    duplicates = 0
    with Deduper(threshold, ngram) as deduper:  # its index is in temporary files
        for rec in read_stream(path):
            st.records += 1
            fmt = detect_format(rec.data)
            st.format = st.format or fmt
            if fmt is None or any(
                k not in ("empty-user-turn", "identical-replies")
                for _, k, _ in check_record(rec.data, fmt)
            ):
                st.unusable += 1
                continue
            dup = deduper.check(record_text(rec.data, fmt), rec.source)
            if dup is not None:
                duplicates += 1
                st.exact_duplicates += dup.kind == "exact"
            words = _WORD.findall(normalize_for_match(prompt_text(rec.data, fmt)))
            n_uni += len(words)
            n_bi += max(0, len(words) - 1)
            unigrams.update(hash(w) for w in words)
            bigrams.update(hash((a, b)) for a, b in zip(words, words[1:], strict=False))
            turns.append(_turns(rec.data, fmt))
            if tokenizer is not None:
                try:
                    st.lengths.append(record_tokens(tokenizer, rec.data, fmt))
                except TuneforgeError:
                    st.unusable += 1
    usable = st.records - st.unusable
    if usable == 0:
        raise TuneforgeError(f"{path}: no usable record (run `tuneforge data validate {path}`)")
    if st.lengths:
        a = np.array(st.lengths)
        st.tokens = {
            "min": int(a.min()),
            "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)),
            "max": int(a.max()),
            "mean": round(float(a.mean()), 1),
        }
        st.over_max_length = int((a > max_length).sum())
    t = np.array(turns)
    st.turns = {"min": int(t.min()), "median": float(np.median(t)), "max": int(t.max())}
    st.duplicate_rate = st.exact_duplicates / usable
    st.distinct_1 = len(unigrams) / n_uni if n_uni else 0.0
    st.distinct_2 = len(bigrams) / n_bi if n_bi else 0.0
    st.clusters = deduper.n_clusters
    st.near_duplicate_share = (deduper.n_clusters + duplicates) / usable
    return st


def plot_lengths(st: DataStats, out: str | Path) -> Path:
    """A histogram of token lengths with the max_length line, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise TuneforgeError(f"{out}: the plot is a PNG; give the file a .png name")
    if not st.lengths:
        raise TuneforgeError(f"{st.path}: no token lengths to plot")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(st.lengths, bins=min(50, max(5, len(set(st.lengths)))), color="#4c72b0")
    ax.axvline(st.max_length, color="#c44e52", linestyle="--", label=f"max_length {st.max_length}")
    ax.set_xlabel("tokens per record (rendered with the chat template)")
    ax.set_ylabel("records")
    ax.set_title(f"{Path(st.path).name}: {len(st.lengths)} records, {st.over_max_length} too long")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
