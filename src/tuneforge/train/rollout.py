"""The outer loop of the objectives that generate their own data (ppo, grpo), written once.

One step = one rollout: sample responses to ``rollout_batch_size`` prompts, score them, then
optimise on them (the objective's ``make_rollout`` and ``optimise``). The loop around it, eval,
early stopping, checkpoints and exact resume, and the logging, are shared with train/loop.py's
pieces. Each step reseeds the random generators from ``(training.seed, step)``, so sampling and
dropout after a resume are those of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tuneforge.accel.fused import fused_ops
from tuneforge.config import TrainingConfig
from tuneforge.data.batching import epoch_order
from tuneforge.data.records import Messages
from tuneforge.data.render import IGNORE, end_of_turn_ids, render_prompt
from tuneforge.infer.generate import first_stop, generate_tokens, left_padded, sampling_kwargs
from tuneforge.run_status import stop_requested
from tuneforge.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tuneforge.train.loop import (
    BestKeeper,
    LoopResult,
    _truncate_metrics,
    build_optimizer,
    eval_due,
    log_record,
    lr_lambda,
    save_due,
    step_schedule,
)
from tuneforge.train.policy import frozen_copy, labelled_logprobs
from tuneforge.train.precision import Precision


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


class RolloutTrainer:
    """Subclasses supply ``make_rollout(step)``, ``optimise(rollout, step) -> metrics``,
    ``rollout_metrics(rollout) -> metrics`` and ``evaluate() -> (value, metrics)`` (higher is
    better); ``updates_per_step`` optimizer steps follow each rollout."""

    name = "rollout"

    def __init__(
        self,
        model: torch.nn.Module,
        policy: torch.nn.Module,
        tokenizer,
        prompts: list,
        eval_prompts: list,
        cfg: TrainingConfig,
        run_dir: Path,
        device: torch.device,
        adapter: bool,
        updates_per_step: int,
        loggers: list | None = None,
        needs_reference: bool = True,
    ):
        self.model = model  # what trains (the policy, or the policy with a value head)
        self.policy = policy  # the causal LM that samples
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.eval_prompts = eval_prompts
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        # bf16 / fp16 autocast around every forward, float16's loss scaling (train/precision.py)
        self.precision = Precision.of(cfg, device)
        self.scaler = self.precision.grad_scaler()
        self.loggers = loggers or []  # training.report_to
        # The reference policy: the base with the adapter disabled, or a frozen copy (full).
        self.reference = None if adapter or not needs_reference else frozen_copy(policy)
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        R = cfg.rollout_batch_size
        self.total_steps = (
            cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * len(prompts) / R)
        )
        self.optimizer = build_optimizer(model, cfg)
        total_updates = self.total_steps * updates_per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(cfg.lr_scheduler, int(cfg.warmup_ratio * total_updates), total_updates),
        )

    # -- what the objective supplies ----------------------------------------------------------------
    def make_rollout(self, step: int):
        raise NotImplementedError

    def optimise(self, rollout, step: int) -> dict[str, float]:
        raise NotImplementedError

    def rollout_metrics(self, rollout) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> tuple[float, dict[str, float]]:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch's loss (scaled under float16)."""
        self.scaler.backward(loss)

    def update(self, params: list[torch.nn.Parameter]) -> float | None:
        """One optimizer step on the accumulated gradients (clipped to ``max_grad_norm``);
        returns the gradient norm before clipping (None without clipping). Under float16 a step
        whose gradients overflowed is skipped and the loss scale halved."""
        self.scaler.unscale(self.optimizer)
        norm = None
        if self.cfg.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        step_schedule(self.scheduler)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- rollouts -----------------------------------------------------------------------------------
    def prompts_for(self, step: int) -> list:
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
            self.policy,
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

    def rows(self, prompt_ids, response_ids) -> dict[str, torch.Tensor]:
        """Right-padded prompt + response rows on the device, labels on the responses."""
        seqs = [p + r for p, r in zip(prompt_ids, response_ids, strict=True)]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            mask[i, : len(p) + len(r)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reference is not None:
            return labelled_logprobs(self.reference, batch, self.cfg.temperature)
        with self.policy.disable_adapter():
            return labelled_logprobs(self.policy, batch, self.cfg.temperature)

    # -- the loop -----------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Steps per pass over the prompts."""
        return max(1, len(self.prompts) // self.cfg.rollout_batch_size)

    def _eval_due(self, step: int) -> bool:
        has_eval = bool(self.eval_prompts)
        return eval_due(step, self.total_steps, self.steps_per_epoch, self.cfg, has_eval)

    def _save_due(self, step: int, evaluated: bool) -> bool:
        has_eval = bool(self.eval_prompts)
        last = not has_eval and step == self.total_steps  # a rollout step is costly: keep it
        return save_due(step, self.steps_per_epoch, self.cfg, has_eval, evaluated) or last

    def run(self, resume: bool = False) -> LoopResult:
        with fused_ops(self.policy, self.cfg.fused_ops):
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
            self.scaler.load_state_dict(state.pop("grad_scaler", None))
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
            desc=self.name,
        )
        start = time.perf_counter()
        first = self.total_steps if state["stopped_early"] else state["global_step"]
        with open(metrics_path, "a") as log:
            for step in range(first, self.total_steps):
                t0 = time.perf_counter()
                torch.manual_seed(step_seed(t.seed, step))
                lr = self.scheduler.get_last_lr()[0]
                scale = self.scaler.scale  # float16: the loss scale this step starts with
                with self.precision.autocast():
                    rollout = self.make_rollout(step)
                stats = self.optimise(rollout, step)  # autocasts its forwards itself
                state["global_step"] = step + 1
                record = {"step": step + 1, **self.rollout_metrics(rollout), **stats, "lr": lr}
                if scale is not None:
                    record["loss_scale"] = scale
                record = {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}
                record["seconds"] = round(time.perf_counter() - t0, 2)
                if (step + 1) % t.logging_steps == 0 or step + 1 == self.total_steps:
                    log_record(log, self.loggers, record)
                bar.set_postfix({k: f"{record[k]:.3f}" for k in ("reward", "kl") if k in record})
                bar.update(1)
                evaluated = self._eval_due(step + 1)
                if evaluated:
                    with self.precision.autocast():
                        value, metrics = self.evaluate()
                    state["stopped_early"] = keeper.update(step + 1, value, metrics)
                    log_record(
                        log,
                        self.loggers,
                        {
                            "step": step + 1,
                            "eval_reward": round(value, 6),
                            **{f"eval_{k}": round(v, 6) for k, v in metrics.items()},
                            "best_step": state["best_step"],
                        },
                    )
                    bar.write(f"step {step + 1}: eval reward {value:.4f}")
                log.flush()
                stopping = stop_requested()  # SIGTERM: a checkpoint now, then stop
                if self._save_due(step + 1, evaluated) or state["stopped_early"] or stopping:
                    save_checkpoint(
                        ckpt_root,
                        step + 1,
                        self.model,
                        self.optimizer,
                        self.scheduler,
                        {**state, "grad_scaler": self.scaler.state_dict()},
                        keeper.for_checkpoint(step + 1),
                        t.save_total_limit,
                    )
                if stopping:
                    raise KeyboardInterrupt("stopped by SIGTERM after a checkpoint")
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
            best_eval_metrics=(
                {} if best is None else {"reward": best, **state.get("best_eval_metrics", {})}
            ),
        )


def rollout_summary(run_dir: Path, result: LoopResult, data) -> dict:
    """The summary.json fields of the rollout objectives: the best eval reward and the first and
    last steps' mean rewards (from metrics.jsonl, which a resumed run has whole)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    return {
        "best_eval_reward": result.best_eval_metrics.get("reward"),
        "first_step_reward": rewards[0] if rewards else None,
        "last_step_reward": rewards[-1] if rewards else None,
        "train_prompts": len(data.train),
        "eval_prompts": len(data.eval),
    }
