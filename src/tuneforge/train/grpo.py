"""GRPO (Shao et al. 2024): group-relative policy optimisation with reward functions.

Each step samples ``num_generations`` completions for each of ``rollout_batch_size`` prompts,
scores them with ``training.reward_functions`` (train/reward_functions.py), and takes each
completion's advantage relative to its group (``losses.group_advantages``): no reward model and no
value head. The clipped surrogate (with DAPO's clip-higher), the optional k3 KL term against the
reference (the adapter disabled, or a frozen copy for full fine-tuning) and the loss
normalisations are TRL's, under TRL's names (``loss_type``, ``scale_rewards``, ``beta``,
``epsilon``, ``num_iterations``). It runs in the outer loop PPO shares (train/rollout.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from tuneforge.config import TrainingConfig
from tuneforge.data.preference import PromptRecord, prepare_prompt_records
from tuneforge.data.render import IGNORE, ensure_chat_template
from tuneforge.infer.generate import generate
from tuneforge.losses import (
    group_advantages,
    grpo_loss_sum,
    grpo_token_losses,
    grpo_units,
    nanstd,
)
from tuneforge.methods import trains_adapter
from tuneforge.train.policy import labelled_logprobs
from tuneforge.train.reward_functions import RewardFunction, combine, load_rewards, score_all
from tuneforge.train.rollout import RolloutTrainer, rollout_summary
from tuneforge.train.run import ObjectiveRun


@dataclass
class GroupRollout:
    """N = prompts x num_generations completions (each group consecutive); (N, T-1) tensors are
    aligned with the shifted labels (position t scores token t+1)."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels (completion tokens)
    mask: torch.Tensor  # (N, T-1) completion tokens that count in the loss
    lengths: torch.Tensor  # (N,) completion tokens
    ended: torch.Tensor  # (N,) the completion ended with an end-of-turn token
    old_logprobs: torch.Tensor | None  # at sampling time (num_iterations > 1)
    ref_logprobs: torch.Tensor | None  # the reference's (beta > 0)
    per_function: torch.Tensor  # (N, F), NaN where a function said None
    rewards: torch.Tensor  # (N,) weighted sum
    advantages: torch.Tensor  # (N,)
    zero_std: torch.Tensor  # (N,) the group's rewards are all equal

    def rows(self, idx: torch.Tensor) -> GroupRollout:
        """The rows ``idx``, trimmed to their longest sequence."""
        T = int(self.batch["attention_mask"][idx].sum(-1).max())
        cut = {k: v[idx, :T] for k, v in self.batch.items()}

        def tokens(x):
            return None if x is None else x[idx, : T - 1]

        return GroupRollout(
            cut,
            self.mask[idx, : T - 1],
            self.lengths[idx],
            self.ended[idx],
            tokens(self.old_logprobs),
            tokens(self.ref_logprobs),
            self.per_function[idx],
            self.rewards[idx],
            self.advantages[idx],
            self.zero_std[idx],
        )


class GRPOTrainer(RolloutTrainer):
    """GRPO's rollouts and updates in the shared outer loop; see the module docstring."""

    name = "grpo"

    def __init__(
        self,
        lm: torch.nn.Module,
        tokenizer,
        rewards: list[RewardFunction],
        prompts: list[PromptRecord],
        eval_prompts: list[PromptRecord],
        cfg: TrainingConfig,
        run_dir: Path,
        device: torch.device,
        adapter: bool,
        loggers: list | None = None,
    ):
        completions = cfg.rollout_batch_size * cfg.num_generations
        minibatch = cfg.batch_size * cfg.gradient_accumulation
        super().__init__(
            lm,
            lm,
            tokenizer,
            prompts,
            eval_prompts,
            cfg,
            run_dir,
            device,
            adapter,
            cfg.num_iterations * (completions // minibatch),
            loggers,
            needs_reference=cfg.beta > 0,
        )
        self.rewards = rewards
        self.eps_low = cfg.epsilon
        self.eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high

    # -- rollout ----------------------------------------------------------------------------------
    def score(self, items: list[PromptRecord], texts: list[str], tokens: list[int]):
        """(N, F) rewards of each completion under each function, and (N,) their weighted sum."""
        fields = {k: [it.fields[k] for it in items] for k in items[0].fields}
        prompts = [it.prompt for it in items]
        per_function = score_all(self.rewards, prompts, texts, fields, tokens)
        return per_function, combine(per_function, self.cfg.reward_weights)

    @torch.no_grad()
    def make_rollout(self, step: int) -> GroupRollout:
        t = self.cfg
        G = t.num_generations
        items = [item for item in self.prompts_for(step) for _ in range(G)]
        prompt_ids, response_ids, ended = self.sample([it.messages for it in items])
        batch = self.rows(prompt_ids, response_ids)
        mask = batch["labels"][:, 1:] != IGNORE
        ended_t = torch.tensor(ended, device=self.device)
        if t.mask_truncated_completions:
            mask = mask & ended_t.unsqueeze(1)
        self.model.eval()
        old = labelled_logprobs(self.policy, batch, t.temperature) if t.num_iterations > 1 else None
        ref = self.reference_logprobs(batch) if t.beta > 0 else None
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in response_ids]
        per_function, rewards = self.score(items, texts, [len(r) for r in response_ids])
        advantages, zero_std = group_advantages(rewards, G, t.scale_rewards)
        return GroupRollout(
            batch,
            mask,
            torch.tensor([len(r) for r in response_ids], dtype=torch.float32),
            ended_t,
            old,
            ref,
            per_function,
            rewards,
            advantages.to(self.device),
            zero_std,
        )

    def rollout_metrics(self, r: GroupRollout) -> dict[str, float]:
        """TRL's GRPO metrics: the reward and its per-group std, the share of groups that teach
        nothing (all rewards equal), each function's mean and std, completion lengths."""
        G = self.cfg.num_generations
        out = {
            "reward": float(r.rewards.nanmean()),
            "reward_std": float(nanstd(r.rewards.view(-1, G), 1).nanmean()),
            "frac_reward_zero_std": float(r.zero_std.float().mean()),
        }
        for i, fn in enumerate(self.rewards):
            col = r.per_function[:, i]
            seen = col[~col.isnan()]
            out[f"rewards/{fn.name}/mean"] = float(seen.mean()) if seen.numel() else float("nan")
            out[f"rewards/{fn.name}/std"] = float(seen.std()) if seen.numel() > 1 else 0.0
        out["completion_length"] = float(r.lengths.mean())
        out["truncated_fraction"] = float((~r.ended).float().mean())
        return out

    # -- optimisation -------------------------------------------------------------------------------
    def optimise(self, rollout: GroupRollout, step: int) -> dict[str, float]:
        """``num_iterations`` passes over the rollout; one optimizer step per mini-batch of
        ``batch_size * gradient_accumulation`` completions, the loss normalised over the whole
        mini-batch as ``loss_type`` says (so 4 x 1 and 1 x 4 micro-batches agree)."""
        t = self.cfg
        N, mb = rollout.rewards.numel(), t.batch_size * t.gradient_accumulation
        g = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
        loss_total, clipped, kl, tokens, grad_norms, updates = 0.0, 0.0, 0.0, 0.0, [], 0
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        for _ in range(t.num_iterations):
            perm = torch.randperm(N, generator=g)
            for start in range(0, N, mb):
                micro = [
                    rollout.rows(perm[i : i + t.batch_size].to(self.device))
                    for i in range(start, start + mb, t.batch_size)
                ]
                units = sum(grpo_units(r.mask, t.loss_type) for r in micro)
                for r in micro:
                    with self.precision.autocast():
                        logprobs = labelled_logprobs(self.policy, r.batch, t.temperature)
                    old = r.old_logprobs if r.old_logprobs is not None else logprobs.detach()
                    losses, hit, token_kl = grpo_token_losses(
                        logprobs,
                        old,
                        r.advantages,
                        self.eps_low,
                        self.eps_high,
                        t.beta,
                        r.ref_logprobs,
                    )
                    loss = grpo_loss_sum(losses, r.mask, t.loss_type, t.response_length)
                    self.backward(loss / max(units, 1e-8))
                    loss_total += float(loss.detach()) / max(units, 1e-8)
                    clipped += float((hit & r.mask).sum())
                    if token_kl is not None:
                        kl += float((token_kl.detach() * r.mask).sum())
                    tokens += float(r.mask.sum())
                norm = self.update(params)
                if norm is not None:
                    grad_norms.append(norm)
                updates += 1
        n = max(tokens, 1.0)
        out = {"loss": loss_total / max(updates, 1), "clip_fraction": clipped / n}
        if t.beta > 0:
            out["kl"] = kl / n
        if grad_norms:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return out

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict[str, float]]:
        """Mean total reward of greedy completions to the eval prompts, and each function's."""
        items = self.eval_prompts
        texts = generate(
            self.policy,
            self.tokenizer,
            [it.messages for it in items],
            max_new_tokens=self.cfg.response_length,
            batch_size=self.cfg.rollout_batch_size,
        )
        tokens = [len(self.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in texts]
        per_function, rewards = self.score(items, texts, tokens)
        metrics = {
            f"rewards/{fn.name}": float(per_function[:, i].nanmean())
            for i, fn in enumerate(self.rewards)
        }
        return float(rewards.nan_to_num(0.0).mean()), metrics


class GRPORun(ObjectiveRun):
    """GRPO in the run skeleton (train/run.py): prompt records with fields, reward functions,
    the shared rollout loop."""

    def prepare_data(self, cfg, tokenizer, lm):
        ensure_chat_template(tokenizer)
        t = cfg.training
        self.rewards = load_rewards(t.reward_functions, t.response_length)  # checked now
        train, evals = prepare_prompt_records(cfg.data, t.seed)
        return SimpleNamespace(train=train, eval=evals)

    def describe_data(self, cfg, data) -> list[str]:
        fields = ", ".join(sorted(data.train[0].fields)) if data.train else ""
        return [
            f"data: {len(data.train)} training prompts, {len(data.eval)} eval prompts"
            + (f"; fields for the rewards: {fields}" if fields else "")
        ]

    def fit(self, ctx, model, data):
        trainer = GRPOTrainer(
            model,
            ctx.tokenizer,
            self.rewards,
            data.train,
            data.eval,
            ctx.cfg.training,
            ctx.run_dir,
            ctx.device,
            adapter=trains_adapter(ctx.cfg.method),
            loggers=ctx.loggers,
        )
        return trainer.run(resume=ctx.resume)

    def summary(self, ctx, result, data) -> dict:
        return {
            **rollout_summary(ctx.run_dir, result, data),
            "best_eval_metrics": result.best_eval_metrics,
        }
