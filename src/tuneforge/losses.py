"""Pure tensor loss functions. Inputs are logits / hidden states / labels; outputs are tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions (the plain reference path).

    Args:
        logits: (B, T, V)
        labels: (B, T), IGNORE where not supervised.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()  # (n, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def selective_lm_loss_sum(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Same value and gradients as ``causal_lm_loss_sum`` without a full (B, T, V) logits tensor.

    The LM head is applied only at positions whose next token is supervised, in chunks, and each
    chunk's logits are recomputed in backward instead of being kept (so at most one chunk's
    logits exist at a time).

    Args:
        hidden: (B, T, C) final hidden states (after the last norm).
        head_weight: (V, C) the LM head (bias-free, as in Llama/Qwen/GPT-2 heads).
        labels: (B, T) with IGNORE where not supervised.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]  # (N, C)
    t = targets[keep]  # (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, t.numel(), chunk_size):
        total = total + checkpoint(
            _chunk_ce,
            h[i : i + chunk_size],
            head_weight,
            t[i : i + chunk_size],
            use_reentrant=False,
        )
    return total
