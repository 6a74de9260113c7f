"""``tuneforge data split``: a deterministic train/eval split, optionally stratified by a field.

The eval share is ``round(n * fraction)`` records of the originals (at least one, at most n - 1),
chosen by the same seeded shuffle as ``train``'s ``data.eval_split``, so both hold out the same
records for the same seed. With ``--stratify FIELD`` every value of the field gets its share (largest remainders, so the
shares add up to the total). Augmented records (tagged by ``augment``) never go to eval: they
follow their original into train, and are dropped when their original is held out, where they
would be a near copy of an eval record inside the training data.

Two streaming passes: the first reads what the choice needs (one small key per record), the
second writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.data.fields import dotted
from tuneforge.data.io import Record
from tuneforge.datatools.augment import is_augmented, origin_key
from tuneforge.datatools.mix import quotas
from tuneforge.datatools.stream import atomic_output, dumps, read_stream
from tuneforge.errors import TuneforgeError


@dataclass
class SplitPlan:
    originals: int
    eval_index: set[int]  # positions among the originals
    strata: dict[str, tuple[int, int]] = field(default_factory=dict)  # value -> (records, eval)


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def eval_count(n: int, fraction: float) -> int:
    """How many of ``n`` records an eval ``fraction`` holds out (at least 1, at most n - 1)."""
    if not 0 < fraction < 1:
        raise TuneforgeError(f"the eval fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise TuneforgeError(f"cannot split {n} record(s); a split needs at least 2")
    return min(n - 1, max(1, round(n * fraction)))


def _order(n: int, seed: int, stratum: str | None) -> list[int]:
    """A seeded shuffle of range(n): the one ``train`` has always used for ``data.eval_split``
    when unstratified; one generator per stratum otherwise."""
    import torch

    from tuneforge.data.batching import epoch_order

    if stratum is None:
        return epoch_order(n, seed, -1)
    g = torch.Generator().manual_seed((seed * 1_000_003 + _stable(stratum)) % 2**63)
    return torch.randperm(n, generator=g).tolist()


def plan_split(strata: list[str] | None, fraction: float, seed: int, n: int = 0) -> SplitPlan:
    """Which originals go to eval, given each original's stratum (None: unstratified, ``n``
    records).

    Each stratum is shuffled by its own generator (seeded by ``seed`` and the stratum's value), so
    the choice within one stratum does not depend on the others.
    """
    if strata is None:
        n_eval = eval_count(n, fraction)
        return SplitPlan(n, set(_order(n, seed, None)[:n_eval]))
    n = len(strata)
    n_eval = eval_count(n, fraction)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    names = sorted(groups)
    shares = quotas(n_eval, [len(groups[s]) for s in names])
    plan = SplitPlan(n, set())
    for name, k in zip(names, shares, strict=True):
        members = groups[name]
        chosen = _order(len(members), seed, name)[:k]
        plan.eval_index.update(members[j] for j in chosen)
        plan.strata[name] = (len(members), k)
    return plan


def _stratum(rec: Record, stratify: str | None) -> str:
    if not stratify:
        return ""
    try:
        value = dotted(rec.data, stratify)
    except KeyError:
        raise rec.error(
            f"'{stratify}' is missing (every record needs the --stratify field)"
        ) from None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


@dataclass
class SplitReport:
    train: int = 0
    eval: int = 0
    dropped_augmented: int = 0
    strata: dict[str, tuple[int, int]] = field(default_factory=dict)


def assign(
    records: Iterable[Record], fraction: float, seed: int, stratify: str | None = None
) -> tuple[SplitPlan, list[bool | None]]:
    """Read pass: the plan, and for each record True (eval), False (train) or None (dropped)."""
    strata: list[str] = []
    keys: list[str] = []  # origin key of each original
    order: list[int | str] = []  # per record: its index among originals, or its origin's key
    for rec in records:
        if is_augmented(rec.data):
            order.append(str(rec.data.get("augmented_origin", "")))
            continue
        order.append(len(keys))
        strata.append(_stratum(rec, stratify))
        keys.append(origin_key(rec.data))
    plan = plan_split(strata if stratify else None, fraction, seed, len(keys))
    held = {keys[i] for i in plan.eval_index}
    sides = [
        (x in plan.eval_index) if isinstance(x, int) else (None if x in held else False)
        for x in order
    ]
    return plan, sides


def split_file(
    path: str | Path,
    fraction: float,
    seed: int = 42,
    stratify: str | None = None,
    train_out: str | Path | None = None,
    eval_out: str | Path | None = None,
) -> tuple[SplitReport, Path, Path]:
    """Split ``path`` into train and eval files (both written only on success).

    Default outputs sit next to the input: ``NAME.train.jsonl`` and ``NAME.eval.jsonl``.
    """
    path = Path(path)
    train_out = Path(train_out or path.with_name(f"{path.stem}.train.jsonl"))
    eval_out = Path(eval_out or path.with_name(f"{path.stem}.eval.jsonl"))
    if train_out.resolve() == eval_out.resolve():
        raise TuneforgeError(f"{train_out}: the train and eval outputs must be different files")
    plan, sides = assign(read_stream(path), fraction, seed, stratify)
    report = SplitReport(strata=plan.strata if stratify else {})
    with (
        atomic_output(train_out, inputs=(path,)) as tf,
        atomic_output(eval_out, inputs=(path,)) as ef,
    ):
        for rec, side in zip(read_stream(path), sides, strict=True):
            if side is None:
                report.dropped_augmented += 1
            elif side:
                ef.write(dumps(rec.data))
                report.eval += 1
            else:
                tf.write(dumps(rec.data))
                report.train += 1
    return report, train_out, eval_out


def split_records(
    records: list[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record], int]:
    """The same choice in memory (``data.eval_split``): (train, eval, augmented records dropped)."""
    _, sides = assign(records, fraction, seed)
    train = [r for r, s in zip(records, sides, strict=True) if s is False]
    evals = [r for r, s in zip(records, sides, strict=True) if s is True]
    return train, evals, sum(s is None for s in sides)
