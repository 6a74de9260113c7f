"""KTO (Ethayarajh et al. 2024): learning from single completions labelled desirable or not.

The reference is the policy with its adapter disabled, or, for full fine-tuning, a frozen copy of
the starting weights. The reference point ``z_ref`` is the policy-to-reference log-ratio of
mismatched (prompt, completion) pairs in each micro-batch (``data.labelled.collate_labelled``),
computed without gradient and clamped at 0, as TRL does.
"""

from __future__ import annotations

import torch

from tuneforge.data.labelled import collate_labelled, prepare_labelled_data
from tuneforge.losses import kto_kl, kto_loss
from tuneforge.methods import trains_adapter
from tuneforge.train.dpo import adapter_disabled, sequence_logps
from tuneforge.train.policy import frozen_copy
from tuneforge.train.run import ObjectiveRun, loop_summary, pair_loop


class KTOObjective:
    """KTO losses summed over examples; the loop normalises per example."""

    name = "kto"

    def __init__(
        self,
        beta: float,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference: torch.nn.Module | None = None,
    ):
        self.beta = beta
        self.weights = (desirable_weight, undesirable_weight)
        self.reference = reference  # a frozen copy (full fine-tuning); None: adapter disabled

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["desirable"].numel()

    @torch.no_grad()
    def reference_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reference is not None:
            return sequence_logps(self.reference, batch)
        with adapter_disabled(model):
            return sequence_logps(model, batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        B = batch["desirable"].numel()
        rows = {k: v for k, v in batch.items() if k != "desirable"}
        examples = {k: v[:B] for k, v in rows.items()}
        mismatched = {k: v[B:] for k, v in rows.items()}
        policy = sequence_logps(model, examples)
        with torch.no_grad():
            policy_kl = sequence_logps(model, mismatched)
        reference = self.reference_logps(model, rows)
        kl = kto_kl(policy_kl, reference[B:])
        good = batch["desirable"]
        losses, rewards = kto_loss(policy, reference[:B], good, kl, self.beta, *self.weights)
        metrics = {
            "kl": kl * B,
            "rewards": rewards.sum(),
            # the implicit reward has the label's sign
            "rewards_accuracy": ((rewards > 0) == good).float().sum(),
        }
        return losses.sum(), metrics


class KTORun(ObjectiveRun):
    """KTO in the run skeleton (train/run.py): labelled completions, the shared loop."""

    def prepare_data(self, cfg, tokenizer, lm):
        return prepare_labelled_data(cfg.data, tokenizer, cfg.training.seed)

    def describe_data(self, cfg, data) -> list[str]:
        lines = []
        for kind, items, st in (
            ("training", data.train, data.train_stats),
            ("eval", data.eval, data.eval_stats),
        ):
            if not items and kind == "eval":
                continue
            good = sum(x.desirable for x in items)
            line = f"data: {len(items)} {kind} examples ({good} desirable, {len(items) - good} not)"
            if st.truncated:
                line += f"; {st.truncated} truncated to {cfg.data.max_length} tokens"
            if st.dropped_no_labels:
                line += f"; {st.dropped_no_labels} dropped (prompt fills data.max_length)"
            lines.append(line)
        return lines

    def wrap(self, ctx, data):
        # Before the loop restores any checkpoint: the reference is the starting model.
        self.reference = None if trains_adapter(ctx.cfg.method) else frozen_copy(ctx.lm)
        return ctx.lm

    def fit(self, ctx, model, data):
        t = ctx.cfg.training
        pad = ctx.tokenizer.pad_token_id
        n = ctx.cfg.data.max_length
        objective = KTOObjective(
            t.beta, t.desirable_weight, t.undesirable_weight, reference=self.reference
        )
        return pair_loop(ctx, model, data, objective, lambda xs: collate_labelled(xs, pad, n))

    def summary(self, ctx, result, data) -> dict:
        return {
            **loop_summary(result, data),
            "desirable_examples": sum(x.desirable for x in data.train),
            "best_eval_metrics": result.best_eval_metrics,
        }
