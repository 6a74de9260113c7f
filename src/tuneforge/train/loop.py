"""The shared training loop: optimizer groups, LR schedule, token-normalised accumulation,
clipping, eval, early stopping, checkpoints with exact resume, metrics and progress."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tuneforge.config import TrainingConfig
from tuneforge.data.batching import collate_padded, iterate_eval, micro_batches
from tuneforge.data.render import Sample
from tuneforge.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)


def build_optimizer(model: torch.nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (every 1-D parameter)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(
        groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon
    )


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@dataclass
class LoopResult:
    global_step: int
    total_steps: int
    stopped_early: bool = False
    best_step: int | None = None
    best_eval_loss: float | None = None
    last_train_loss: float | None = None
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    supervised_tokens: int = 0


class Trainer:
    """Runs an objective over samples. ``objective`` has ``units(batch)`` and ``loss_sum(model, batch)``."""

    def __init__(
        self,
        model: torch.nn.Module,
        objective,
        train_samples: list[Sample],
        eval_samples: list[Sample],
        cfg: TrainingConfig,
        run_dir: Path,
        pad_id: int,
        device: torch.device,
        collate=None,
        loggers: list | None = None,
    ):
        self.model = model
        self.loggers = loggers or []  # e.g. TensorBoardLogger: .log(record), .close()
        self.objective = objective
        self.train_samples = train_samples
        self.eval_samples = eval_samples
        self.cfg = cfg
        self.run_dir = run_dir
        self.pad_id = pad_id
        self.device = device
        self.collate = collate or (lambda samples: collate_padded(samples, pad_id))
        micro_per_epoch = math.ceil(len(train_samples) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation)
        self.total_steps = (
            cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * self.steps_per_epoch)
        )
        self.optimizer = build_optimizer(model, cfg)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, warmup, self.total_steps)
        )
        self._epoch_cache: dict[int, list[list[int]]] = {}

    # -- data position -------------------------------------------------------------------------
    def window(self, step: int) -> list[list[int]]:
        """Micro-batches (index lists) of optimizer step ``step`` (0-based), fixed by seed alone."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {
                epoch: micro_batches(self.train_samples, self.cfg.batch_size, self.cfg.seed, epoch)
            }
        micro = self._epoch_cache[epoch]
        a = self.cfg.gradient_accumulation
        return micro[k * a : (k + 1) * a]

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- one step ---------------------------------------------------------------------------------
    def accumulate_gradients(self, step: int) -> dict:
        """Forward/backward over the step's micro-batches, each loss divided by the units (e.g.
        supervised tokens) of the whole window, so 8 x 1 and 1 x 8 give the same gradient."""
        batches = [self.collate([self.train_samples[i] for i in mb]) for mb in self.window(step)]
        units = sum(self.objective.units(b) for b in batches)
        total = 0.0
        for b in batches:
            loss_sum = self.objective.loss_sum(self.model, self._to_device(b))
            (loss_sum / max(units, 1)).backward()
            total += float(loss_sum.detach())
        return {"loss": total / max(units, 1), "tokens": units}

    def train_step(self, step: int) -> dict:
        out = self.accumulate_gradients(step)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            grads = [p.grad.norm() for p in params if p.grad is not None]
            grad_norm = float(torch.norm(torch.stack(grads))) if grads else 0.0
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": out["loss"], "grad_norm": grad_norm, "lr": lr, "tokens": out["tokens"]}

    @torch.no_grad()
    def evaluate(self) -> float:
        was_training = self.model.training
        self.model.eval()
        total, units = 0.0, 0
        for b in iterate_eval(self.eval_samples, self.cfg.batch_size, self.pad_id):
            total += float(self.objective.loss_sum(self.model, self._to_device(b)))
            units += self.objective.units(b)
        if was_training:
            self.model.train()
        return total / max(units, 1)

    def _eval_due(self, step: int) -> bool:
        if not self.eval_samples:
            return False
        if step == self.total_steps:
            return True
        if self.cfg.eval_steps > 0:
            return step % self.cfg.eval_steps == 0
        return step % self.steps_per_epoch == 0

    def _save_due(self, step: int, evaluated: bool) -> bool:
        if self.cfg.save_steps > 0:
            return step % self.cfg.save_steps == 0
        return evaluated or (not self.eval_samples and step % self.steps_per_epoch == 0)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> LoopResult:
        cfg = self.cfg
        metrics_path = self.run_dir / "metrics.jsonl"
        ckpt_root = self.run_dir / "checkpoints"
        state = {
            "global_step": 0,
            "best_eval_loss": None,
            "best_step": None,
            "bad_evals": 0,
            "eval_history": [],
            "supervised_tokens": 0,
        }
        best_state = None
        if resume:
            ckpts = list_checkpoints(ckpt_root)
            if ckpts:
                state, best_state = load_checkpoint(
                    ckpts[-1], self.model, self.optimizer, self.scheduler
                )
                _truncate_metrics(metrics_path, state["global_step"])
        self.model.train()
        fault_step = int(os.environ.get("TUNEFORGE_FAULT_KILL_AT_STEP", "0"))  # test hook: SIGKILL
        bar = tqdm(
            total=self.total_steps,
            initial=state["global_step"],
            disable=not cfg.progress,
            file=sys.stderr,
            dynamic_ncols=True,
            desc="train",
        )
        start = time.perf_counter()
        stopped_early = bool(state.get("stopped_early"))
        last_loss = None
        first_step = self.total_steps if stopped_early else state["global_step"]
        with open(metrics_path, "a") as metrics:
            for step in range(first_step, self.total_steps):
                t0 = time.perf_counter()
                out = self.train_step(step)
                dt = time.perf_counter() - t0
                state["global_step"] = step + 1
                state["supervised_tokens"] += out["tokens"]
                last_loss = out["loss"]
                if fault_step and state["global_step"] == fault_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                record = {
                    "step": step + 1,
                    "epoch": round((step + 1) / self.steps_per_epoch, 4),
                    **{k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()},
                    "tokens_per_s": round(out["tokens"] / dt, 1),
                }
                if (step + 1) % cfg.logging_steps == 0 or step + 1 == self.total_steps:
                    metrics.write(json.dumps(record) + "\n")
                    for logger in self.loggers:
                        logger.log(record)
                bar.set_postfix(
                    loss=f"{out['loss']:.4f}",
                    lr=f"{out['lr']:.2e}",
                    tok_s=f"{out['tokens'] / dt:.0f}",
                )
                bar.update(1)
                evaluated = False
                if self._eval_due(step + 1):
                    evaluated = True
                    eval_loss = self.evaluate()
                    state["eval_history"].append([step + 1, eval_loss])
                    best = state["best_eval_loss"]
                    if best is None or eval_loss < best:
                        state.update(best_eval_loss=eval_loss, best_step=step + 1, bad_evals=0)
                        best_state = trainable_state(self.model)
                    else:
                        state["bad_evals"] += 1
                    metrics.write(
                        json.dumps(
                            {
                                "step": step + 1,
                                "eval_loss": round(eval_loss, 6),
                                "best_step": state["best_step"],
                            }
                        )
                        + "\n"
                    )
                    for logger in self.loggers:
                        logger.log({"step": step + 1, "eval_loss": eval_loss})
                    bar.write(
                        f"step {step + 1}: eval_loss {eval_loss:.4f} (best {state['best_eval_loss']:.4f} at step {state['best_step']})"
                    )
                    if (
                        cfg.early_stopping_patience
                        and state["bad_evals"] >= cfg.early_stopping_patience
                    ):
                        stopped_early = True
                metrics.flush()
                if self._save_due(step + 1, evaluated) or stopped_early:
                    save_best = best_state if state["best_step"] != step + 1 else None
                    save_checkpoint(
                        ckpt_root,
                        step + 1,
                        self.model,
                        self.optimizer,
                        self.scheduler,
                        {**state, "stopped_early": stopped_early},
                        save_best,
                        cfg.save_total_limit,
                    )
                if stopped_early:
                    bar.write(
                        f"early stopping: no eval improvement in {cfg.early_stopping_patience} evaluations"
                    )
                    break
        bar.close()
        for logger in self.loggers:
            logger.close()
        if best_state is not None and state["best_step"] != state["global_step"]:
            load_trainable_state(self.model, best_state)  # keep the best weights
        return LoopResult(
            global_step=state["global_step"],
            total_steps=self.total_steps,
            stopped_early=stopped_early,
            best_step=state["best_step"],
            best_eval_loss=state["best_eval_loss"],
            last_train_loss=last_loss,
            eval_history=[tuple(x) for x in state["eval_history"]],
            seconds=time.perf_counter() - start,
            supervised_tokens=state["supervised_tokens"],
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    keep = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
    ]
    path.write_text("".join(ln + "\n" for ln in keep))
