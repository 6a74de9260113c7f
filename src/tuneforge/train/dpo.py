"""Direct preference optimisation (Rafailov et al. 2023) and its IPO / hinge variants.

The reference model is the policy with its adapter disabled (peft's ``disable_adapter()``; no
second copy in memory) or, for full fine-tuning, log-probs precomputed once with the starting
weights before the first step (``precompute_reference_logps``).
"""

from __future__ import annotations

import contextlib

import torch

from tuneforge.data.preference import PairSample, collate_pairs
from tuneforge.errors import TuneforgeError
from tuneforge.losses import dpo_loss
from tuneforge.train.policy import labelled_logprobs, response_token_counts


def adapter_disabled(model: torch.nn.Module):
    """Context in which a peft model computes with its base weights only (the reference)."""
    if not hasattr(model, "disable_adapter"):
        raise TuneforgeError(
            "the reference model needs an adapter to disable; full fine-tuning uses precomputed "
            "reference log-probs (training.precompute_reference)"
        )
    return model.disable_adapter()


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows,) summed log-probs of each row's labelled (response) tokens."""
    return labelled_logprobs(model, batch).sum(-1)


class DPOObjective:
    """DPO-family loss summed over pairs, and (``rpo_alpha`` > 0) the chosen responses' NLL summed
    over their tokens: the loop divides each by its own count over the whole optimizer step
    (``unit_keys``), so the loss is the mean over pairs plus ``rpo_alpha`` times the mean NLL per
    chosen token (RPO, Pang et al. 2024; TRL's ``loss_type=["sigmoid", "sft"]`` with
    ``loss_weights=[1, rpo_alpha]``). The NLL keeps the chosen responses likely, against DPO's
    tendency to lower both responses' log-probs (likelihood displacement).

    Batches are ``collate_pairs`` batches (B chosen rows, then B rejected rows), with
    ``reference_logps`` when precomputed. Reports the implicit rewards, their margin and accuracy.
    """

    name = "dpo"
    unit_keys = ("pairs", "tokens")

    def __init__(self, beta: float, loss_type: str = "sigmoid", rpo_alpha: float = 0.0):
        self.beta = beta
        self.loss_type = loss_type
        self.rpo_alpha = rpo_alpha

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        chosen = response_token_counts(batch["labels"]).chunk(2)[0]
        return {"pairs": batch["input_ids"].size(0) // 2, "tokens": int(chosen.sum())}

    def reference_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference_logps" in batch:
            return batch["reference_logps"]
        with torch.no_grad(), adapter_disabled(model):
            return sequence_logps(model, batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        policy = sequence_logps(model, batch)  # (2B,)
        reference = self.reference_logps(model, batch)
        tokens = response_token_counts(batch["labels"])
        pc, pr = policy.chunk(2)
        rc, rr = reference.chunk(2)
        nc, nr = tokens.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            pc, pr, rc, rr, self.beta, self.loss_type, nc, nr
        )
        metrics = {
            "logps_chosen": pc.detach().sum(),
            "logps_rejected": pr.detach().sum(),
            "rewards_chosen": chosen_rewards.sum(),
            "rewards_rejected": rejected_rewards.sum(),
            "rewards_margin": (chosen_rewards - rejected_rewards).sum(),
            "rewards_accuracy": (chosen_rewards > rejected_rewards).float().sum(),
        }
        nll = -pc.sum() if self.rpo_alpha else pc.new_zeros(())
        if self.rpo_alpha:
            metrics["nll_chosen"] = nll.detach()
        return {"pairs": losses.sum(), "tokens": self.rpo_alpha * nll}, metrics


@torch.no_grad()
def precompute_reference_logps(
    model: torch.nn.Module,
    pairs: list[PairSample],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    use_adapter_disabled: bool,
) -> None:
    """Store ``reference_logps`` on every pair, from the model as it is now (the start of training).

    Call before the loop restores a checkpoint, so a resumed run keeps the original reference.
    """
    was_training = model.training
    model.eval()
    ctx = adapter_disabled(model) if use_adapter_disabled else contextlib.nullcontext()
    with ctx:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            for p in chunk:
                p.reference_logps = None
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            logps = sequence_logps(model, batch).cpu()
            chosen, rejected = logps.chunk(2)
            for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                p.reference_logps = (c, r)
    if was_training:
        model.train()
