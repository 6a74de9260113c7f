"""PPO for language models: rollouts from prompts, a reward, a per-token KL penalty against the
reference policy, GAE, and clipped policy and value losses.

Schulman et al. 2017 (PPO), in the RLHF setup of Ziegler et al. 2019 and Ouyang et al. 2022. PPO
generates its own data, so it has its own outer loop; it reuses the shared loop's optimizer,
schedule and checkpoint/resume pieces. One PPO step = one rollout of ``rollout_batch_size``
prompts, then ``num_ppo_epochs`` passes of mini-batch updates over it.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tuneforge.accel.fused import fused_ops
from tuneforge.config import TrainingConfig
from tuneforge.data.batching import epoch_order
from tuneforge.data.preference import prepare_prompts
from tuneforge.data.records import Messages
from tuneforge.data.render import IGNORE, end_of_turn_ids, ensure_chat_template, render_prompt
from tuneforge.files import atomic_path
from tuneforge.infer.generate import (
    first_stop,
    generate,
    generate_tokens,
    left_padded,
    sampling_kwargs,
)
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
from tuneforge.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from tuneforge.train.loop import (
    BestKeeper,
    LoopResult,
    _truncate_metrics,
    build_optimizer,
    eval_due,
    log_record,
    lr_lambda,
    save_due,
)
from tuneforge.train.policy import decoder_hidden, labelled_logprobs
from tuneforge.train.reward import make_reward
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


class PPOTrainer:
    """The PPO outer loop over prompts; see the module docstring."""

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
        self.model = model
        self.tokenizer = tokenizer
        self.reward = reward
        self.prompts = prompts
        self.eval_prompts = eval_prompts
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        self.loggers = loggers or []  # training.report_to
        # The reference policy: the base with the adapter disabled, or a frozen copy (full).
        self.reference = None if adapter else _frozen_copy(model.lm)
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        R, mb = cfg.rollout_batch_size, cfg.batch_size * cfg.gradient_accumulation
        self.updates_per_step = cfg.num_ppo_epochs * (R // mb)
        self.total_steps = (
            cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * len(prompts) / R)
        )
        self.optimizer = build_optimizer(model, cfg)
        total_updates = self.total_steps * self.updates_per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(cfg.lr_scheduler, int(cfg.warmup_ratio * total_updates), total_updates),
        )

    # -- rollout ----------------------------------------------------------------------------------
    def prompts_for(self, step: int) -> list[Messages]:
        """The step's prompts: consecutive slices of per-epoch shuffles, fixed by the seed."""
        n, R = len(self.prompts), self.cfg.rollout_batch_size
        orders: dict[int, list[int]] = {}
        out = []
        for i in range(step * R, (step + 1) * R):
            epoch, k = divmod(i, n)
            if epoch not in orders:
                orders[epoch] = epoch_order(n, self.cfg.seed, epoch)
            out.append(self.prompts[orders[epoch][k]])
        return out

    @torch.no_grad()
    def sample(
        self, prompts: list[Messages]
    ) -> tuple[list[list[int]], list[list[int]], list[bool]]:
        """Sample a response to each prompt: (prompt ids, response ids, ended with end of turn)."""
        t = self.cfg
        prompt_ids = [render_prompt(self.tokenizer, p) for p in prompts]
        ids, mask = left_padded(prompt_ids, self.pad_id)
        T = ids.size(1)
        self.model.eval()
        out = generate_tokens(
            self.model.lm,
            ids.to(self.device),
            mask.to(self.device),
            **sampling_kwargs(t.temperature, top_p=1.0, top_k=0),  # the policy's own distribution
            max_new_tokens=t.response_length,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        responses, ended = [], []
        for row in out[:, T:].tolist():
            stop = first_stop(row, self.stop_ids)
            responses.append(row if stop is None else row[: stop + 1])  # the stop is an action too
            ended.append(stop is not None)
        return prompt_ids, responses, ended

    def _rows(self, prompt_ids, response_ids) -> dict[str, torch.Tensor]:
        seqs = [p + r for p, r in zip(prompt_ids, response_ids, strict=True)]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            mask[i, : len(p) + len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @torch.no_grad()
    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reference is not None:
            return labelled_logprobs(self.reference, batch, self.cfg.temperature)
        with self.model.lm.disable_adapter():
            return labelled_logprobs(self.model.lm, batch, self.cfg.temperature)

    @torch.no_grad()
    def make_rollout(self, step: int) -> Rollout:
        """Generate, score and compute KL, rewards, values and advantages for one PPO step."""
        t = self.cfg
        prompts = self.prompts_for(step)
        prompt_ids, response_ids, ended = self.sample(prompts)
        batch = {k: v.to(self.device) for k, v in self._rows(prompt_ids, response_ids).items()}
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
                    logprobs, values, _ = self.model(r.batch, t.temperature)
                    pg, clipped = ppo_policy_loss(
                        logprobs, r.logprobs, r.advantages, r.mask, t.cliprange
                    )
                    vf, vf_clipped = ppo_value_loss(
                        values, r.values, r.returns, r.mask, t.cliprange_value
                    )
                    ((pg + t.vf_coef * vf) / units).backward()
                    diff = (logprobs - r.logprobs).detach() * r.mask
                    sums["policy_loss"] += float(pg.detach())
                    sums["value_loss"] += float(vf.detach())
                    sums["clipped"] += float(clipped)
                    sums["vf_clipped"] += float(vf_clipped)
                    sums["approx_kl"] += float(0.5 * (diff**2).sum())
                    tokens += float(r.mask.sum())
                if t.max_grad_norm > 0:
                    grad_norms.append(
                        float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
                    )
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
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
    def evaluate(self) -> float:
        """Mean reward of greedy responses to the eval prompts."""

        responses = generate(
            self.model.lm,
            self.tokenizer,
            self.eval_prompts,
            max_new_tokens=self.cfg.response_length,
            batch_size=self.cfg.rollout_batch_size,
        )
        return float(self.reward(self.eval_prompts, responses).mean())

    @property
    def steps_per_epoch(self) -> int:
        """PPO steps per pass over the prompts."""
        return max(1, len(self.prompts) // self.cfg.rollout_batch_size)

    def _eval_due(self, step: int) -> bool:
        has_eval = bool(self.eval_prompts)
        return eval_due(step, self.total_steps, self.steps_per_epoch, self.cfg, has_eval)

    def _save_due(self, step: int, evaluated: bool) -> bool:
        has_eval = bool(self.eval_prompts)
        last = not has_eval and step == self.total_steps  # a rollout step is costly: keep it
        return save_due(step, self.steps_per_epoch, self.cfg, has_eval, evaluated) or last

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> LoopResult:
        with fused_ops(self.model.lm, self.cfg.fused_ops):
            return self._run(resume)

    def _run(self, resume: bool = False) -> LoopResult:
        t = self.cfg
        metrics_path = self.run_dir / "metrics.jsonl"
        ckpt_root = self.run_dir / "checkpoints"
        state = {"global_step": 0, "best_eval_reward": None, "best_step": None, "bad_evals": 0}
        state.update(eval_history=[], stopped_early=False)
        best_state = None
        if resume:
            ckpts = list_checkpoints(ckpt_root)
            state, best_state = load_checkpoint(
                ckpts[-1], self.model, self.optimizer, self.scheduler
            )
            _truncate_metrics(metrics_path, state["global_step"])
        keeper = BestKeeper(
            self.model, state, "best_eval_reward", t.early_stopping_patience, True, best_state
        )
        bar = tqdm(
            total=self.total_steps,
            initial=state["global_step"],
            disable=not t.progress,
            file=sys.stderr,
            dynamic_ncols=True,
            desc="ppo",
        )
        start = time.perf_counter()
        first = self.total_steps if state["stopped_early"] else state["global_step"]
        with open(metrics_path, "a") as log:
            for step in range(first, self.total_steps):
                t0 = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                rollout = self.make_rollout(step)
                stats = self.optimise(rollout, step)
                state["global_step"] = step + 1
                record = {"step": step + 1, **rollout_metrics(rollout), **stats, "lr": lr}
                record = {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}
                record["seconds"] = round(time.perf_counter() - t0, 2)
                if (step + 1) % t.logging_steps == 0 or step + 1 == self.total_steps:
                    log_record(log, self.loggers, record)
                bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
                bar.update(1)
                evaluated = self._eval_due(step + 1)
                if evaluated:
                    value = self.evaluate()
                    state["stopped_early"] = keeper.update(step + 1, value)
                    log_record(
                        log,
                        self.loggers,
                        {
                            "step": step + 1,
                            "eval_reward": round(value, 6),
                            "best_step": state["best_step"],
                        },
                    )
                    bar.write(f"step {step + 1}: eval reward {value:.4f}")
                log.flush()
                if self._save_due(step + 1, evaluated) or state["stopped_early"]:
                    save_checkpoint(
                        ckpt_root,
                        step + 1,
                        self.model,
                        self.optimizer,
                        self.scheduler,
                        state,
                        keeper.for_checkpoint(step + 1),
                        t.save_total_limit,
                    )
                if state["stopped_early"]:
                    bar.write(
                        f"early stopping: no eval improvement in {t.early_stopping_patience} evaluations"
                    )
                    break
        bar.close()
        for logger in self.loggers:
            logger.close()
        keeper.restore_best()  # keep the best weights
        best = state["best_eval_reward"]
        return LoopResult(
            global_step=state["global_step"],
            total_steps=self.total_steps,
            stopped_early=state["stopped_early"],
            best_step=state["best_step"],
            eval_history=[tuple(x) for x in state["eval_history"]],
            seconds=time.perf_counter() - start,
            best_eval_metrics={} if best is None else {"reward": best},
        )


def _frozen_copy(lm: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(lm)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


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
        rows = [json.loads(x) for x in (ctx.run_dir / "metrics.jsonl").read_text().splitlines()]
        rewards = [r["reward"] for r in rows if "reward" in r]
        return {
            "best_eval_reward": result.best_eval_metrics.get("reward"),
            "first_step_reward": rewards[0] if rewards else None,
            "last_step_reward": rewards[-1] if rewards else None,
            "train_prompts": len(data.train),
            "eval_prompts": len(data.eval),
        }
