"""Samples -> batches: padded (optionally grouped by length) and, with ``packing``, packed rows."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from tuneforge.data.render import IGNORE, Sample


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A deterministic shuffle per epoch, independent of any global RNG (so resume can replay it)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(
    samples: list[Sample], batch_size: int, seed: int, epoch: int, group_by_length: bool = False
) -> list[list[int]]:
    """Index lists, one per micro-batch, for one epoch."""
    order = epoch_order(len(samples), seed, epoch)
    if group_by_length:
        # Sort within large windows so batches have similar lengths (less padding) while the
        # order across windows stays random.
        window = batch_size * 64
        grouped = []
        for i in range(0, len(order), window):
            chunk = sorted(order[i : i + window], key=lambda j: -len(samples[j]))
            batches = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
            random.Random(seed + epoch + i).shuffle(batches)
            grouped += batches
        return grouped
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate_padded(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    T = max(len(s) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s)
        input_ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Target positions in a batch (labels shifted by one, as the loss uses them)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def iterate_eval(samples: list[Sample], batch_size: int, pad_id: int) -> Iterator[dict]:
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    for i in range(0, len(order), batch_size):
        yield collate_padded([samples[j] for j in order[i : i + batch_size]], pad_id)


# -- packing ------------------------------------------------------------------------------------
def pack_rows(
    samples: list[Sample], max_length: int, seed: int, epoch: int, per_sample: int = 0
) -> list[list[int]]:
    """Group sample indices into rows of at most ``max_length`` tokens (first-fit decreasing).

    The epoch's shuffled order breaks ties, so rows differ between epochs but are fixed by seed.
    ``per_sample`` tokens are counted in addition to each sample's own (prompt tuning puts its
    soft prompt in front of every sample of a row).
    """
    order = epoch_order(len(samples), seed, epoch)
    order.sort(key=lambda i: -len(samples[i]))  # stable: equal lengths keep the shuffled order
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(samples[i]) + per_sample
        for r, free in enumerate(space):
            if n <= free:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(max_length - n)
    # Shuffle rows so long and short rows mix across micro-batches.
    perm = epoch_order(len(rows), seed + 1, epoch)
    return [rows[p] for p in perm]


def collate_packed(
    rows: list[list[Sample]], pad_id: int, varlen: bool = False
) -> dict[str, torch.Tensor]:
    """Packed batch: each row holds several samples; each sample attends only to itself.

    Position ids restart at 0 for every sample. In transformers 5 with SDPA that alone does NOT
    isolate samples, so a 4D block-diagonal causal mask (B, 1, T, T) is passed too. With
    ``varlen`` no mask is built: a variable-length attention path (flash-attn's, or
    tuneforge.attention's per-sample SDPA) finds the samples from the position ids. The first label of each sample is ignored: it would otherwise be
    predicted from the previous sample's last token.
    """
    T = max(sum(len(s) for s in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # which sample each position belongs to
    for b, row in enumerate(rows):
        pos = 0
        for k, s in enumerate(row):
            n = len(s)
            input_ids[b, pos : pos + n] = torch.tensor(s.input_ids)
            lab = torch.tensor(s.labels)
            lab[0] = IGNORE
            labels[b, pos : pos + n] = lab
            position_ids[b, pos : pos + n] = torch.arange(n)
            segment[b, pos : pos + n] = k
            pos += n
        position_ids[b, pos:] = torch.arange(T - pos)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if varlen:
        return batch
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    real = (segment >= 0)[:, :, None]
    mask = same & causal & real
    # Padding rows attend to themselves only, so no softmax row is empty (SDPA would give NaN).
    mask |= torch.eye(T, dtype=torch.bool)[None] & ~real
    batch["attention_mask"] = mask[:, None]  # (B, 1, T, T), True = may attend
    return batch
