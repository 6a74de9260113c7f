"""Preference pairs without a reference model: ORPO (Hong et al. 2024) and SimPO (Meng et al.
2024). Both score a response by its mean per-token log-prob; ORPO adds the chosen responses' NLL
(the SFT term), SimPO optionally does (``cpo_alpha``, as TRL's CPOTrainer). No reference forward
pass and no second copy of the model."""

from __future__ import annotations

import torch

from tuneforge.losses import orpo_loss, simpo_loss
from tuneforge.train.policy import labelled_logprobs, response_token_counts


class ReferenceFreeObjective:
    """ORPO or SimPO summed over pairs, and the chosen responses' NLL summed over their tokens:
    the loop divides each by its own count over the whole optimizer step (``unit_keys``), so the
    loss is TRL's mean over pairs plus mean over chosen tokens, whatever the accumulation."""

    unit_keys = ("pairs", "tokens")

    def __init__(self, name: str, beta: float, simpo_gamma: float = 0.5, cpo_alpha: float = 0.0):
        self.name = name
        self.beta = beta
        self.simpo_gamma = simpo_gamma
        self.nll_weight = 1.0 if name == "orpo" else cpo_alpha

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        chosen = response_token_counts(batch["labels"]).chunk(2)[0]
        return {"pairs": batch["input_ids"].size(0) // 2, "tokens": int(chosen.sum())}

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logps = labelled_logprobs(model, batch).sum(-1)  # (2B,) summed over response tokens
        mean = logps / response_token_counts(batch["labels"]).clamp(min=1)
        chosen, rejected = mean.chunk(2)
        metrics = {}
        if self.name == "orpo":
            losses, log_odds = orpo_loss(chosen, rejected, self.beta)
            metrics["log_odds_chosen"] = log_odds.sum()  # TRL's name for the mean log-odds
        else:
            losses = simpo_loss(chosen, rejected, self.beta, self.simpo_gamma)
        nll = -logps.chunk(2)[0].sum()
        rc, rr = self.beta * chosen.detach(), self.beta * rejected.detach()
        metrics.update(
            logps_chosen=logps.detach().chunk(2)[0].sum(),
            logps_rejected=logps.detach().chunk(2)[1].sum(),
            rewards_chosen=rc.sum(),
            rewards_rejected=rr.sum(),
            rewards_margin=(rc - rr).sum(),
            rewards_accuracy=(rc > rr).float().sum(),
        )
        return {"pairs": losses.sum(), "tokens": self.nll_weight * nll}, metrics
