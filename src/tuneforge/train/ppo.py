"""PPO for language models: rollouts from prompts, a reward, a per-token KL penalty against the
reference policy, GAE, and clipped policy and value losses.

Schulman et al. 2017 (PPO), in the RLHF setup of Ziegler et al. 2019 and Ouyang et al. 2022. PPO
generates its own data: it runs in the outer loop GRPO shares (train/rollout.py). One PPO step =
one rollout of ``rollout_batch_size`` prompts, then ``num_ppo_epochs`` passes of mini-batch
updates over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from tuneforge.config import TrainingConfig
from tuneforge.data.preference import prepare_prompts
from tuneforge.data.records import Messages
from tuneforge.data.render import IGNORE, ensure_chat_template
from tuneforge.files import atomic_path
from tuneforge.infer.generate import generate
from tuneforge.losses import (
    entropy_from_logits,
    gae,
    kl_per_token,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)
from tuneforge.methods import trains_adapter, unwrap
from tuneforge.train.policy import decoder_hidden
from tuneforge.train.reward import make_reward
from tuneforge.train.rollout import RolloutTrainer, rollout_summary
from tuneforge.train.run import ObjectiveRun

VALUE_HEAD_FILE = "value_head.safetensors"


# -- model ----------------------------------------------------------------------------------------
class PolicyWithValue(torch.nn.Module):
    """The policy LM and a scalar value head on its final hidden states (shared backbone)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        base = unwrap(lm)
        param = next(p for p in lm.parameters() if p.is_floating_point())  # not 4-bit codes
        self.value_head = torch.nn.Linear(
            base.config.hidden_size, 1, device=param.device, dtype=param.dtype
        )
        torch.nn.init.zeros_(self.value_head.weight)  # V = 0 until it has learnt something
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: dict[str, torch.Tensor], temperature: float = 1.0):
        """Per-token ``(logprobs, values, entropy)``, each (B, T-1), zero outside the response.

        Position t holds the log-prob of token t+1 and the value of the state before it.
        """
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        hidden = decoder_hidden(self.lm, batch)[:, :-1][keep]  # (N, C)
        logits = unwrap(self.lm).get_output_embeddings()(hidden) / temperature  # (N, V)
        zeros = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        logprobs = zeros.masked_scatter(keep, token_logprobs(logits, targets[keep]))
        values = zeros.masked_scatter(keep, self.value_head(hidden).squeeze(-1).float())
        entropy = zeros.masked_scatter(keep, entropy_from_logits(logits.detach()))
        return logprobs, values, entropy


# -- rollouts -------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One batch of generated responses and everything PPO derives from it; (B, T-1) tensors are
    aligned with the shifted labels (position t scores token t+1)."""

    prompts: list[Messages]
    responses: list[str]
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels (response tokens)
    mask: torch.Tensor  # (B, T-1) true on response tokens
    ended: torch.Tensor  # (B,) response ended with an end-of-turn token
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    scores: torch.Tensor  # (B,) reward of each response (after missing_eos_penalty)
    kl: torch.Tensor  # per-token KL used in the reward
    rewards: torch.Tensor  # -kl_coef * kl, plus the score on the last response token
    advantages: torch.Tensor
    returns: torch.Tensor

    def rows(self, idx: torch.Tensor) -> Rollout:
        """The rows ``idx``, trimmed to their longest sequence."""
        T = int(self.batch["attention_mask"][idx].sum(-1).max())
        sel = {k: v[idx, :T] for k, v in self.batch.items()}
        fields = {}
        for name in ("mask", "logprobs", "ref_logprobs", "values", "entropy", "kl", "rewards"):
            fields[name] = getattr(self, name)[idx, : T - 1]
        for name in ("advantages", "returns"):
            fields[name] = getattr(self, name)[idx, : T - 1]
        return Rollout(
            [self.prompts[i] for i in idx.tolist()],
            [self.responses[i] for i in idx.tolist()],
            sel,
            ended=self.ended[idx],
            scores=self.scores[idx],
            **fields,
        )


def shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token reward: ``-kl_coef * kl`` on every response token, plus the score on the last
    (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2)."""
    rewards = -kl_coef * kl * mask
    last = mask.long().cumsum(-1).argmax(-1)  # index of the last response token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def rollout_metrics(r: Rollout) -> dict[str, float]:
    """What a PPO step logs about its rollout. ``kl`` is the KL in the reward, summed per response."""
    lengths = r.mask.sum(-1).float()
    return {
        "reward": float(r.scores.mean()),
        "reward_std": float(r.scores.std()) if len(r.scores) > 1 else 0.0,
        "kl": float((r.kl * r.mask).sum(-1).mean()),
        "non_score_reward": float((r.rewards.sum(-1) - r.scores).mean()),
        "entropy": float(masked_mean(r.entropy, r.mask)),
        "response_length": float(lengths.mean()),
        "ended": float(r.ended.float().mean()),
    }


class PPOTrainer(RolloutTrainer):
    """PPO's rollouts and updates in the shared outer loop (train/rollout.py)."""

    name = "ppo"

    def __init__(
        self,
        model: PolicyWithValue,
        tokenizer,
        reward: Callable[[list[Messages], list[str]], torch.Tensor],
        prompts: list[Messages],
        eval_prompts: list[Messages],
        cfg: TrainingConfig,
        run_dir: Path,
        device: torch.device,
        adapter: bool,
        loggers: list | None = None,
    ):
        R, mb = cfg.rollout_batch_size, cfg.batch_size * cfg.gradient_accumulation
        super().__init__(
            model,
            model.lm,
            tokenizer,
            prompts,
            eval_prompts,
            cfg,
            run_dir,
            device,
            adapter,
            cfg.num_ppo_epochs * (R // mb),
            loggers,
        )
        self.reward = reward

    @torch.no_grad()
    def make_rollout(self, step: int) -> Rollout:
        """Generate, score and compute KL, rewards, values and advantages for one PPO step."""
        t = self.cfg
        prompts = self.prompts_for(step)
        prompt_ids, response_ids, ended = self.sample(prompts)
        batch = self.rows(prompt_ids, response_ids)
        self.model.eval()
        logprobs, values, entropy = self.model(batch, t.temperature)
        ref_logprobs = self.reference_logprobs(batch)
        mask = batch["labels"][:, 1:] != IGNORE
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in response_ids]
        ended_t = torch.tensor(ended, device=self.device)
        scores = self.reward(prompts, texts).to(self.device)
        scores = scores - t.missing_eos_penalty * (~ended_t).float()
        kl = kl_per_token(logprobs, ref_logprobs) * mask
        rewards = shaped_rewards(scores, kl, mask, t.kl_coef)
        shaped = whiten(rewards, mask, shift_mean=False) if t.whiten_rewards else rewards
        advantages, returns = gae(shaped, values, mask, t.gamma, t.lam)
        advantages = whiten(advantages, mask)
        return Rollout(
            prompts,
            texts,
            batch,
            mask,
            ended_t,
            logprobs,
            ref_logprobs,
            values,
            entropy,
            scores,
            kl,
            rewards,
            advantages,
            returns,
        )

    # -- optimisation ---------------------------------------------------------------------------------
    def optimise(self, rollout: Rollout, step: int) -> dict[str, float]:
        """``num_ppo_epochs`` passes of clipped updates over the rollout; one optimizer step per
        mini-batch of ``batch_size * gradient_accumulation`` responses, normalised per token."""
        t = self.cfg
        B, mb = len(rollout.prompts), t.batch_size * t.gradient_accumulation
        g = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
        sums = dict.fromkeys(
            ("policy_loss", "value_loss", "clipped", "vf_clipped", "approx_kl"), 0.0
        )
        tokens = 0.0
        grad_norms = []
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        for _ in range(t.num_ppo_epochs):
            perm = torch.randperm(B, generator=g)
            for start in range(0, B, mb):
                minibatch = perm[start : start + mb]
                units = float(rollout.mask[minibatch].sum().clamp(min=1))
                for i in range(0, len(minibatch), t.batch_size):
                    r = rollout.rows(minibatch[i : i + t.batch_size].to(rollout.mask.device))
                    with self.precision.autocast():
                        logprobs, values, _ = self.model(r.batch, t.temperature)
                    pg, clipped = ppo_policy_loss(
                        logprobs, r.logprobs, r.advantages, r.mask, t.cliprange
                    )
                    vf, vf_clipped = ppo_value_loss(
                        values, r.values, r.returns, r.mask, t.cliprange_value
                    )
                    self.backward((pg + t.vf_coef * vf) / units)
                    diff = (logprobs - r.logprobs).detach() * r.mask
                    sums["policy_loss"] += float(pg.detach())
                    sums["value_loss"] += float(vf.detach())
                    sums["clipped"] += float(clipped)
                    sums["vf_clipped"] += float(vf_clipped)
                    sums["approx_kl"] += float(0.5 * (diff**2).sum())
                    tokens += float(r.mask.sum())
                norm = self.update(params)
                if norm is not None:
                    grad_norms.append(norm)
        n = max(tokens, 1.0)
        return {
            "policy_loss": sums["policy_loss"] / n,
            "value_loss": sums["value_loss"] / n,
            "clip_fraction": sums["clipped"] / n,
            "value_clip_fraction": sums["vf_clipped"] / n,
            "approx_kl": sums["approx_kl"] / n,
            **({"grad_norm": sum(grad_norms) / len(grad_norms)} if grad_norms else {}),
        }

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict]:
        """Mean reward of greedy responses to the eval prompts."""
        responses = generate(
            self.policy,
            self.tokenizer,
            self.eval_prompts,
            max_new_tokens=self.cfg.response_length,
            batch_size=self.cfg.rollout_batch_size,
        )
        return float(self.reward(self.eval_prompts, responses).mean()), {}

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        return rollout_metrics(rollout)


def save_value_head(model: PolicyWithValue, run_dir: Path) -> None:
    state = {k: v.detach().contiguous() for k, v in model.value_head.state_dict().items()}
    with atomic_path(run_dir / VALUE_HEAD_FILE) as tmp:
        save_file(state, str(tmp))


class PPORun(ObjectiveRun):
    """PPO in the run skeleton (train/run.py): prompt records, the policy with a value head,
    PPO's outer rollout loop (which shares the loop's eval, early-stopping and checkpoint code)."""

    def prepare_data(self, cfg, tokenizer, lm):
        ensure_chat_template(tokenizer)
        prompts, eval_prompts = prepare_prompts(cfg.data, cfg.training.seed)
        self.reward = make_reward(cfg.training)  # a reward model or function: checked now
        return SimpleNamespace(train=prompts, eval=eval_prompts)

    def describe_data(self, cfg, data) -> list[str]:
        return [f"data: {len(data.train)} training prompts, {len(data.eval)} eval prompts"]

    def wrap(self, ctx, data):
        return PolicyWithValue(ctx.lm)

    def fit(self, ctx, model, data):
        self.trainer = PPOTrainer(
            model,
            ctx.tokenizer,
            self.reward,
            data.train,
            data.eval,
            ctx.cfg.training,
            ctx.run_dir,
            ctx.device,
            adapter=trains_adapter(ctx.cfg.method),
            loggers=ctx.loggers,
        )
        return self.trainer.run(resume=ctx.resume)

    def save_extra(self, ctx, model, weights) -> None:  # one process only: weights is None
        save_value_head(model, ctx.run_dir)

    def summary(self, ctx, result, data) -> dict:
        return rollout_summary(ctx.run_dir, result, data)
