"""Mixing datasets by ratio: general data replayed against forgetting, several tasks at once.

Each source gets ``round(total * ratio)`` records (largest remainders, so the quotas add up to
``total`` exactly). A source with fewer records than its quota is repeated whole and topped up
with a random sample; one with more is sampled without repetition. Which records, and the order
the sources are interleaved in, depend only on the seed. Files are streamed: memory holds a
counter per record, never the records.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data.io import Record
from tuneforge.data.records import detect_format
from tuneforge.datatools.stream import atomic_output, count_records, dumps, read_stream
from tuneforge.errors import TuneforgeError


@dataclass
class MixSource:
    path: str
    ratio: float


def parse_mix_arg(spec: str) -> MixSource:
    """``'data/a.jsonl:0.8'`` -> MixSource (the ratio is after the last colon)."""
    path, sep, ratio = spec.rpartition(":")
    try:
        value = float(ratio)
    except ValueError:
        value = math.nan
    if not sep or not path or not 0 < value <= 1:
        raise TuneforgeError(
            f"mix source '{spec}' must be PATH:RATIO with a ratio in (0, 1], e.g. general.jsonl:0.2"
        )
    return MixSource(path, value)


def parse_mix_config(entries: list[Any], where: str = "data.mix") -> list[dict]:
    """Check ``data.mix`` (a list of {path, ratio} or 'path:ratio'); returns [{path, ratio}].

    The ratios are shares of the final training set; ``data.train`` gets what is left over.
    """
    out = []
    for i, entry in enumerate(entries):
        name = f"{where}[{i}]"
        if isinstance(entry, str):
            src = parse_mix_arg(entry)
            entry = {"path": src.path, "ratio": src.ratio}
        if not isinstance(entry, dict):
            raise TuneforgeError(
                f"'{name}' must be a mapping like {{path: general.jsonl, ratio: 0.2}}"
            )
        unknown = set(entry) - {"path", "ratio"}
        if unknown:
            raise TuneforgeError(
                f"'{name}' has unknown key '{sorted(unknown)[0]}'; use path and ratio"
            )
        path, ratio = entry.get("path"), entry.get("ratio")
        if not isinstance(path, str) or not path:
            raise TuneforgeError(f"'{name}' needs a 'path' (a data file)")
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
            raise TuneforgeError(f"'{name}.ratio' must be a number in (0, 1), got {ratio!r}")
        out.append({"path": path, "ratio": float(ratio)})
    total = sum(e["ratio"] for e in out)
    if out and total >= 1:
        raise TuneforgeError(
            f"'{where}' ratios add up to {total:g}; they are shares of the training set and must "
            "leave room for data.train (sum below 1)"
        )
    return out


def quotas(total: int, ratios: list[float]) -> list[int]:
    """Integer shares of ``total`` proportional to ``ratios`` that add up to ``total`` exactly."""
    s = sum(ratios)
    exact = [total * r / s for r in ratios]
    out = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def repeats(count: int, quota: int, rng: np.random.Generator) -> np.ndarray:
    """How many times each of ``count`` records is used so that ``quota`` are used in all."""
    times = np.full(count, quota // count, dtype=np.int32)
    extra = rng.choice(count, size=quota % count, replace=False)
    times[extra] += 1
    return times


def _source_rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, i])


def interleave(counts: list[int], seed: int) -> Iterator[int]:
    """A uniformly random order of ``counts[i]`` draws of each source ``i`` (seeded)."""
    rng = random.Random(seed)
    left = list(counts)
    remaining = sum(left)
    while remaining:
        r = rng.randrange(remaining)
        i = 0
        while r >= left[i]:
            r -= left[i]
            i += 1
        left[i] -= 1
        remaining -= 1
        yield i


@dataclass
class MixReport:
    total: int = 0
    sources: list[dict] = field(default_factory=list)  # path, records, ratio, used, repeated
    converted_to_chat: bool = False


def _stream_selected(path: str, times: np.ndarray, to_chat: bool) -> Iterator[dict]:
    """Selected records of one file: first pass every record used once or more, then a pass for
    each further repetition (so copies of a record are spread apart)."""
    from tuneforge.datatools.convert import instruction_to_chat

    for rep in range(int(times.max()) if len(times) else 0):
        for i, rec in enumerate(read_stream(path)):
            if times[i] > rep:
                data = rec.data
                if to_chat and detect_format(data) == "instruction":
                    data = instruction_to_chat(data)
                yield data


def _formats(paths: list[str]) -> list[str | None]:
    out = []
    for p in paths:
        fmt = None
        for rec in read_stream(p):
            fmt = detect_format(rec.data)
            if fmt:
                break
        out.append(fmt)
    return out


def mix_files(
    sources: list[MixSource], out: str | Path, total: int | None = None, seed: int = 0
) -> MixReport:
    """Write ``total`` records drawn from ``sources`` by ratio into ``out`` (only on success).

    Without ``total``: as many as the sources hold without repeating any record.
    Instruction and chat sources mix as chat records; other formats must match.

    Raises:
        TuneforgeError: ratios that do not add up to 1, unreadable sources, formats that cannot
            share a file, or a total below 1.
    """
    if not sources:
        raise TuneforgeError("give at least one source as PATH:RATIO")
    ratio_sum = sum(s.ratio for s in sources)
    if abs(ratio_sum - 1) > 1e-6:
        raise TuneforgeError(f"mix ratios add up to {ratio_sum:g}; they must add up to 1")
    paths = [s.path for s in sources]
    counts = [count_records(p) for p in paths]
    formats = _formats(paths)
    distinct = set(formats)
    to_chat = len(distinct) > 1 and distinct <= {"instruction", "chat"}
    if len(distinct) > 1 and not to_chat:
        described = ", ".join(f"{p} ({f})" for p, f in zip(paths, formats, strict=True))
        raise TuneforgeError(f"cannot mix these formats into one file: {described}")
    if total is None:
        total = min(math.floor(c / s.ratio + 1e-9) for c, s in zip(counts, sources, strict=True))
    if total < 1:
        raise TuneforgeError(f"--total must be at least 1, got {total}")
    shares = quotas(total, [s.ratio for s in sources])
    plans = [
        repeats(c, q, _source_rng(seed, i))
        for i, (c, q) in enumerate(zip(counts, shares, strict=True))
    ]
    report = MixReport(total=total, converted_to_chat=to_chat)
    for s, c, q, t in zip(sources, counts, shares, plans, strict=True):
        report.sources.append(
            dict(path=s.path, records=c, ratio=s.ratio, used=q, distinct=int((t > 0).sum()))
        )
    streams = [_stream_selected(p, t, to_chat) for p, t in zip(paths, plans, strict=True)]
    with atomic_output(out, inputs=tuple(paths)) as f:
        for i in interleave(shares, seed):
            f.write(dumps(next(streams[i])))
    return report


def mix_records(
    train: list[Record], others: list[tuple[str, list[Record], float]], seed: int
) -> tuple[list[Record], list[dict]]:
    """``data.mix`` at train time: every training record once, plus records of each other source
    so that it makes up its ratio of the result.

    Returns:
        (mixed records, one {path, records, ratio, used} per other source).
    """
    rest = 1 - sum(r for _, _, r in others)
    total = round(len(train) / rest)
    shares = quotas(total - len(train), [r for _, _, r in others]) if others else []
    mixed = list(train)
    notes = []
    for i, ((path, recs, ratio), q) in enumerate(zip(others, shares, strict=True)):
        times = repeats(len(recs), q, _source_rng(seed, i + 1))
        for rep in range(int(times.max()) if len(times) else 0):
            mixed += [r for r, t in zip(recs, times, strict=True) if t > rep]
        notes.append(dict(path=path, records=len(recs), ratio=ratio, used=q))
    return mixed, notes
