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
