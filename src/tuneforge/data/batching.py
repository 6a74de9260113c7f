"""Samples -> batches: padded (optionally grouped by length) and, with ``packing``, packed rows;
``BatchPlan``: how a run forms its micro-batches, used by the trainer and the estimate."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from tuneforge.accel.attention import cu_seq_lens
from tuneforge.accel.attention import register as register_varlen_sdpa
from tuneforge.data.render import IGNORE, Sample
from tuneforge.errors import TuneforgeError


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


def iterate_eval(
    samples: list, batch_size: int, pad_id: int, collate: Callable | None = None
) -> Iterator[dict]:
    """Eval batches: shortest first, ``batch_size`` a batch, padded (or ``collate``'s batches)."""
    collate = collate or (lambda chunk: collate_padded(chunk, pad_id))
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    for i in range(0, len(order), batch_size):
        yield collate([samples[j] for j in order[i : i + batch_size]])


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
    tuneforge.accel.attention's per-sample SDPA) finds the samples from the position ids. The first label of each sample is ignored: it would otherwise be
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


# -- the batch plan -------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    """How a run's micro-batches are formed, in one place: the trainer collates with it and the
    memory / time estimate measures its epoch (plan/estimate.py).

    Micro-batches are global (``batch_size`` per rank times ``world`` ranks; each rank collates
    its slice) and fixed by the seed and the epoch alone, so a resumed run replays them.

    Args:
        samples: the training samples (SFT samples, or preference pairs with a ``collate``).
        attention: the model's attention implementation (sdpa, eager, flash_attention_2, ...).
        prompt_learning: prefix / prompt tuning (virtual tokens: no per-sample attention).
        packed_row_cost: extra tokens each sample takes in a packed row (prompt tuning).
        collate: a custom collate (pairs); None: SFT's padded collate.
        mask_dtype: the model's weights dtype, for eager attention's additive mask.
    """

    samples: list
    batch_size: int
    seed: int
    pad_id: int = 0
    world: int = 1
    packing: bool = False
    max_length: int = 0
    group_by_length: bool = False
    attention: str = "sdpa"
    prompt_learning: bool = False
    packed_row_cost: int = 0
    collate: Callable | None = None
    mask_dtype: torch.dtype = torch.float32
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.flash_varlen = self.attention.startswith("flash")
        # Packed rows without flash-attn: per-sample causal SDPA (tuneforge.accel.attention) instead
        # of a block-diagonal mask over the whole row; eager attention adds a float mask.
        per_sample = self.attention == "sdpa" and not self.prompt_learning
        # Without packing, SFT micro-batches (the default collate) take the same path: the same
        # samples per micro-batch, joined into one row, so no padding is computed and no mask
        # built (the numbers are the padded batch's; tests compare them).
        self.unpadded = not self.packing and self.collate is None and per_sample
        self.varlen_sdpa = (self.packing or self.unpadded) and per_sample
        self.additive_mask = self.packing and self.attention == "eager"
        if self.additive_mask and self.prompt_learning:
            raise TuneforgeError(
                "training.attn_implementation: eager cannot isolate packed samples for prefix or "
                "prompt tuning; use sdpa (the default) or set data.packing: false"
            )

    def epoch(self, epoch: int) -> list[list]:
        """Global micro-batches of one epoch: lists of sample indices, or (packing) of rows."""
        if epoch not in self._cache:
            size = self.batch_size * self.world
            if self.packing:
                rows = pack_rows(
                    self.samples, self.max_length, self.seed, epoch, self.packed_row_cost
                )
                micro = [rows[i : i + size] for i in range(0, len(rows), size)]
            else:
                micro = micro_batches(self.samples, size, self.seed, epoch, self.group_by_length)
            self._cache.clear()  # one epoch at a time
            self._cache[epoch] = micro
        return self._cache[epoch]

    def shapes(self, epoch: int = 0) -> list[tuple[int, int, list[int]]]:
        """``(rows, tokens per row, sample indices)`` of each micro-batch of ``epoch`` as
        padded rows would hold it (packed rows: ``max_length``)."""
        out = []
        for mb in self.epoch(epoch):
            if self.packing:
                out.append((len(mb), self.max_length, [i for row in mb for i in row]))
            else:
                out.append((len(mb), max(len(self.samples[i]) for i in mb), mb))
        return out

    def make_batch(self, spec: list, rank: int = 0) -> dict[str, torch.Tensor] | None:
        """Rank ``rank``'s slice of a global micro-batch, collated (None if the slice is empty)."""
        b = self.batch_size
        spec = spec[rank * b : (rank + 1) * b]
        if not spec:
            return None
        if self.packing:
            rows = [[self.samples[i] for i in row] for row in spec]
        elif self.unpadded:  # one row of the micro-batch's samples
            rows = [[self.samples[i] for i in spec]]
        else:
            return self.collate_samples([self.samples[i] for i in spec])
        varlen = self.flash_varlen or self.varlen_sdpa
        if varlen:
            # Samples are told apart by their restarting positions, so the rows are joined
            # into one: no padding to compute, and transformers' flash-attn path splits a
            # batch by position ids only when it has a single row (_is_packed_sequence).
            rows = [[s for row in rows for s in row]]
        batch = collate_packed(rows, self.pad_id, varlen=varlen)
        if self.varlen_sdpa:
            batch["cu_seq_lens_q"] = cu_seq_lens(batch["position_ids"])
        if self.additive_mask:  # eager attention adds the mask to the scores
            zero = torch.zeros((), dtype=self.mask_dtype)
            batch["attention_mask"] = torch.where(
                batch["attention_mask"], zero, torch.finfo(self.mask_dtype).min
            )
        return batch

    @contextlib.contextmanager
    def attention_for(self, model) -> Iterator[None]:
        """The attention implementation the plan's batches need, on ``model`` inside the block:
        per-sample SDPA (tuneforge.accel.attention) for joined rows; otherwise the model's own."""
        if not self.varlen_sdpa:
            yield
            return
        config = model.config
        config._attn_implementation = register_varlen_sdpa()
        try:
            yield
        finally:
            config._attn_implementation = "sdpa"

    def eval_batches(self, samples: list) -> Iterator[dict[str, torch.Tensor]]:
        """Eval batches of ``samples`` (``iterate_eval`` with the plan's collate)."""
        return iterate_eval(samples, self.batch_size, self.pad_id, self.collate)

    def collate_samples(self, samples: list) -> dict[str, torch.Tensor]:
        """Padded rows of ``samples`` (or the custom collate's batch): eval batches too."""
        if self.collate is not None:
            return self.collate(samples)
        return collate_padded(samples, self.pad_id)
