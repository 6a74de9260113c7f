"""The shared training loop: optimizer groups, LR schedule, token-normalised accumulation,
clipping, eval, early stopping, checkpoints with exact resume, metrics and progress."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tuneforge.accel.fused import fused_ops
from tuneforge.config import TrainingConfig
from tuneforge.data.batching import BatchPlan
from tuneforge.data.render import Sample
from tuneforge.errors import TuneforgeError
from tuneforge.methods.peft_methods import is_prompt_learning
from tuneforge.methods.virtual_packing import packed_row_cost
from tuneforge.run_status import stop_requested
from tuneforge.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_trainable_state,
    rng_state,
    save_checkpoint,
    trainable_state,
)
from tuneforge.train.distributed import Dist
from tuneforge.train.fsdp import (
    full_optimizer_state,
    full_weights,
    gather_full,
    is_sharded,
    to_float,
)
from tuneforge.train.fsdp import grad_norm as global_grad_norm
from tuneforge.train.optimizers import make_optimizer
from tuneforge.train.precision import Precision


def build_optimizer(model: torch.nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW (``training.optimizer``); no weight decay on biases and norms (every 1-D parameter)."""
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
    # torch AdamW, or bitsandbytes' 8-bit / paged AdamW as training.optimizer says
    return make_optimizer(groups, t)


def step_schedule(scheduler) -> None:
    """Advance the LR schedule, also after a skipped update (a non-finite loss, a float16
    overflow): the learning rate stays tied to the step count, and torch's warning that the
    optimizer has not stepped yet is expected then, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()


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
    skipped_steps: int = 0
    best_eval_metrics: dict = field(default_factory=dict)


class BestKeeper:
    """Best-so-far eval tracking, early stopping and the best weights, shared by the loops
    (the Trainer here, PPO's outer loop). ``state`` is the loop's checkpointed state dict; ``key``
    its best-value entry (``best_eval_loss``, lower is better, or ``best_eval_reward``)."""

    def __init__(
        self, model, state: dict, key: str, patience: int, higher_is_better=False, best_state=None
    ):
        self.model, self.state, self.key = model, state, key
        self.patience, self.higher = patience, higher_is_better
        self.best_state: dict | None = best_state  # restored from a checkpoint, when resuming

    def update(
        self, step: int, value: float, metrics: dict | None = None, eligible: bool = True
    ) -> bool:
        """Record an eval at ``step``; returns whether training should stop early now. An eval
        that is not ``eligible`` (a guard's limit passed) is never the best."""
        state = self.state
        state["eval_history"].append([step, value])
        best = state[self.key]
        better = best is None or (value > best if self.higher else value < best)
        if eligible and better:
            state.update({self.key: value, "best_step": step, "bad_evals": 0})
            if metrics is not None:
                state["best_eval_metrics"] = metrics
            self.best_state = trainable_state(self.model)
        else:
            state["bad_evals"] += 1
        return bool(self.patience and state["bad_evals"] >= self.patience)

    def for_checkpoint(self, step: int) -> dict | None:
        """The best weights to store beside a checkpoint at ``step`` (None: they are its own)."""
        return self.best_state if self.state["best_step"] != step else None

    def restore_best(self) -> None:
        """Load the best weights when the last step was not the best."""
        if self.best_state is not None and self.state["best_step"] != self.state["global_step"]:
            load_trainable_state(self.model, self.best_state)


def eval_due(step: int, total_steps: int, steps_per_epoch: int, cfg, has_eval: bool) -> bool:
    """Evaluate after ``step``: every ``eval_steps``, else every epoch, and at the last step."""
    if not has_eval:
        return False
    if step == total_steps:
        return True
    return step % (cfg.eval_steps or steps_per_epoch) == 0


def save_due(step: int, steps_per_epoch: int, cfg, has_eval: bool, evaluated: bool) -> bool:
    """Checkpoint after ``step``: every ``save_steps``, else at each eval (each epoch without)."""
    if cfg.save_steps > 0:
        return step % cfg.save_steps == 0
    return evaluated or (not has_eval and step % steps_per_epoch == 0)


def log_record(metrics, loggers: list, record: dict) -> None:
    """One metrics.jsonl line, and the same record to the ``training.report_to`` loggers."""
    metrics.write(json.dumps(record) + "\n")
    for logger in loggers:
        logger.log(record)


def split_metrics(result) -> tuple[torch.Tensor, dict]:
    """An objective's ``loss_sum`` returns a loss tensor, or ``(loss, metric_sums)``: sums over the
    batch that the loop divides by the same units as the loss and logs (e.g. DPO accuracy)."""
    return result if isinstance(result, tuple) else (result, {})


# An objective whose loss has terms with different denominators (ORPO: a mean over pairs plus
# the chosen responses' NLL, a mean over their tokens) names them in ``unit_keys`` and returns
# ``units(batch)`` as a dict of counts and its loss sum as a dict of tensors, both with those
# keys; the first key is the one metrics and ``tokens`` are counted in. A plain objective
# returns a number and a tensor.
def add_units(a, b):
    if isinstance(b, dict):
        return {k: a.get(k, 0) + v for k, v in b.items()} if a else dict(b)
    return (a or 0) + b


def per_unit(loss_sum, units):
    """The loss: each term divided by its units over the whole window (all micro-batches)."""
    if isinstance(units, dict):
        return sum(loss_sum[k] / max(units[k], 1) for k in units)
    return loss_sum / max(units, 1)


def main_units(units) -> float:
    return next(iter(units.values())) if isinstance(units, dict) else units


def displacement_warning(chosen: list[float], evals: int = 3, drop: float = 1.0) -> str | None:
    """One line when the held-out chosen responses' log-prob fell at each of the last ``evals``
    evaluations and by more than ``drop`` nats since the first: the likelihood displacement of
    DPO-style losses (the margin grows because both log-probs fall, the rejected faster), which
    tends to come with degenerate generations."""
    if len(chosen) <= evals:
        return None
    recent = chosen[-evals - 1 :]
    if (
        all(b < a for a, b in zip(recent, recent[1:], strict=False))
        and chosen[0] - chosen[-1] > drop
    ):
        return (
            f"warning: the held-out chosen responses' log-prob fell at {evals} evaluations in a "
            f"row ({chosen[0]:.2f} -> {chosen[-1]:.2f} per response): the model is moving away "
            "from the preferred answers too; lower training.learning_rate or raise training.beta, "
            "and check its answers with tuneforge eval"
        )
    return None


class Trainer:
    """Runs an objective over samples. ``objective`` has ``units(batch)`` and ``loss_sum(model, batch)``
    (see ``split_metrics`` for metrics an objective reports)."""

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
        packing: bool = False,
        max_length: int = 0,
        group_by_length: bool = False,
        dist: Dist | None = None,
        loggers: list | None = None,
        guard=None,
    ):
        self.model = model
        self.guard = guard  # train/guards.py: the model's answers measured at each evaluation
        self.chosen_logps: list[float] = []  # held-out chosen log-probs at each eval (DPO-style)
        self.displacement_warned = False
        self.loggers = loggers or []  # e.g. TensorBoardLogger: .log(record), .close()
        self.objective = objective
        self.eval_samples = eval_samples
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        # bf16 / fp16 autocast, float32 master weights, float16's loss scaling
        self.precision = Precision.of(cfg, device)
        self.scaler = self.precision.grad_scaler()
        self.last_eval_metrics: dict[str, float] = {}
        self.dist = dist or Dist()
        # FSDP2 (full fine-tuning on several ranks): every forward and backward is a collective
        self.sharded = self.dist.enabled and is_sharded(model)
        attn = str(getattr(getattr(model, "config", None), "_attn_implementation", ""))
        self.plan = BatchPlan(
            train_samples,
            cfg.batch_size,
            cfg.seed,
            pad_id=pad_id,
            world=self.dist.world,
            packing=packing,
            max_length=max_length,
            group_by_length=group_by_length,
            attention=attn,
            prompt_learning=is_prompt_learning(model),
            # prompt tuning: each sample's soft prompt; refuses prefix tuning with flash varlen
            packed_row_cost=packed_row_cost(model, attn.startswith("flash")) if packing else 0,
            collate=collate,
            mask_dtype=self.precision.compute,
        )
        micro_per_epoch = len(self.epoch_micro_batches(0))
        self.steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation)
        self.total_steps = (
            cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * self.steps_per_epoch)
        )
        self.optimizer = build_optimizer(model, cfg)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, warmup, self.total_steps)
        )

    # -- data position -------------------------------------------------------------------------
    def epoch_micro_batches(self, epoch: int) -> list[list]:
        """Micro-batches of one epoch: lists of sample indices, or (packing) lists of rows."""
        return self.plan.epoch(epoch)

    def window(self, step: int) -> list[list]:
        """Micro-batches of optimizer step ``step`` (0-based), fixed by the seed alone."""
        epoch, k = divmod(step, self.steps_per_epoch)
        a = self.cfg.gradient_accumulation
        return self.epoch_micro_batches(epoch)[k * a : (k + 1) * a]

    def make_batch(self, spec: list, rank: int | None = None) -> dict[str, torch.Tensor] | None:
        """This rank's (or ``rank``'s) slice of a global micro-batch, collated (None if the slice
        is empty); see ``BatchPlan``."""
        return self.plan.make_batch(spec, self.dist.rank if rank is None else rank)

    def autocast(self):
        """Autocast to ``training.dtype`` when it is bf16 / fp16 (train/precision.py)."""
        return self.precision.autocast()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- one step ---------------------------------------------------------------------------------
    def accumulate_gradients(self, step: int) -> dict:
        """Forward/backward over the step's micro-batches, each loss divided by the units (e.g.
        supervised tokens) of the whole window, so 8 x 1 and 1 x 8 give the same gradient."""
        specs = self.window(step)
        slices = [self.make_batch(spec) for spec in specs]
        # (batch, counts): under FSDP2 every rank runs every micro-batch (the all-gathers and
        # reduce-scatters are collectives), so a rank whose slice is empty runs rank 0's slice
        # as a stand-in that adds nothing.
        if self.sharded:
            work = [
                (b, True) if b is not None else (self.make_batch(spec, 0), False)
                for b, spec in zip(slices, specs, strict=True)
            ]
        else:
            work = [(b, True) for b in slices if b is not None]
        local = None
        for b, counts in work:
            if counts:
                local = add_units(local, self.objective.units(b))
        units = self._reduce_units(local)  # the whole window, all ranks
        total = 0.0
        metric_sums: dict[str, float] = {}
        for b, counts in work:
            with self.autocast():
                loss_sum, metrics = split_metrics(
                    self.objective.loss_sum(self.model, self._to_device(b))
                )
            loss = per_unit(loss_sum, units)
            if not counts:  # an FSDP2 stand-in: joins the collectives, adds nothing
                self.scaler.backward(loss * 0.0)
                continue
            self.scaler.backward(loss)
            total += float(loss.detach())
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
        if self.dist.enabled and not self.sharded:  # FSDP2 reduce-scattered in backward
            params = [p for p in self.model.parameters() if p.requires_grad]
            for p in params:  # a rank with an empty slice still joins the reduction
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.dist.all_reduce_grads(params)
        if self.dist.enabled:
            total = self.dist.all_reduce_sum(total)
            metric_sums = {k: self.dist.all_reduce_sum(v) for k, v in sorted(metric_sums.items())}
        n = int(main_units(units))
        metrics = {k: v / max(n, 1) for k, v in metric_sums.items()}
        return {"loss": total, "tokens": n, "metrics": metrics}

    def _reduce_units(self, local):
        """Units summed over the ranks (a number, or a dict of counts: see ``per_unit``)."""
        keys = getattr(self.objective, "unit_keys", None)
        if local is None:  # this rank's slices are all empty
            local = dict.fromkeys(keys, 0) if keys else 0
        if isinstance(local, dict):  # every rank reduces in the objective's key order
            return {k: int(self.dist.all_reduce_sum(local[k])) for k in keys}
        return int(self.dist.all_reduce_sum(local))

    def train_step(self, step: int) -> dict:
        out = self.accumulate_gradients(step)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler.unscale(self.optimizer)  # float16: the true gradients, before clipping
        # Under FSDP2 the gradients are DTensors: both give the global norm over all shards.
        if self.cfg.max_grad_norm > 0:
            grad_norm = to_float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            grad_norm = global_grad_norm(params)
        lr = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(out["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
        scale = self.scaler.scale  # the one this step's backward used
        self.scaler.update()  # float16: an overflow halves the loss scale
        # A non-finite loss or gradient skips the update; the schedule still advances so the
        # learning rate stays tied to the step count.
        step_schedule(self.scheduler)
        self.optimizer.zero_grad(set_to_none=True)
        result = {
            "loss": out["loss"],
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": out["tokens"],
            **out["metrics"],
        }
        if scale is not None:
            result["loss_scale"] = scale
        if not finite:
            result["skipped"] = True
            if self.scaler.enabled and math.isfinite(out["loss"]):
                # float16's loss scaling finding its range, not divergence
                result["overflow"] = True
        return result

    @torch.no_grad()
    def evaluate(self) -> float:
        was_training = self.model.training
        self.model.eval()
        totals, units = None, None
        metric_sums: dict[str, float] = {}
        for b, counts in self._eval_work():
            with self.autocast():
                loss_sum, metrics = split_metrics(
                    self.objective.loss_sum(self.model, self._to_device(b))
                )
            if not counts:
                continue
            parts = (
                {k: float(v) for k, v in loss_sum.items()}
                if isinstance(loss_sum, dict)
                else float(loss_sum)
            )
            totals = add_units(totals, parts)
            units = add_units(units, self.objective.units(b))
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
        totals, units = self._reduce_sums(totals), self._reduce_units(units)
        metric_sums = {k: self.dist.all_reduce_sum(v) for k, v in sorted(metric_sums.items())}
        if was_training:
            self.model.train()
        n = main_units(units)
        self.last_eval_metrics = {k: v / max(n, 1) for k, v in metric_sums.items()}
        return float(per_unit(totals, units))

    def _reduce_sums(self, local):
        keys = getattr(self.objective, "unit_keys", None)
        if keys:
            local = local or {}
            return {k: self.dist.all_reduce_sum(local.get(k, 0.0)) for k in keys}
        return self.dist.all_reduce_sum(local or 0.0)

    def _eval_batches(self):
        shard = self.eval_samples[self.dist.rank :: self.dist.world]  # each rank its share
        if not shard:
            return iter(())
        return self.plan.eval_batches(shard)

    def _eval_work(self):
        """(batch, counts) pairs of this rank's evaluation. Under FSDP2 every forward is a
        collective, so every rank runs as many as rank 0 (the largest shard): the others end
        with stand-in batches whose losses are dropped."""
        count = 0
        for b in self._eval_batches():
            count += 1
            yield b, True
        if self.sharded:
            rank0 = math.ceil(len(self.eval_samples) / self.dist.world)
            for _ in range(math.ceil(rank0 / self.cfg.batch_size) - count):
                yield self.plan.collate_samples(self.eval_samples[:1]), False

    def _eval_due(self, step: int) -> bool:
        return eval_due(
            step, self.total_steps, self.steps_per_epoch, self.cfg, bool(self.eval_samples)
        )

    def _save_due(self, step: int, evaluated: bool) -> bool:
        return save_due(step, self.steps_per_epoch, self.cfg, bool(self.eval_samples), evaluated)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> LoopResult:
        """Train to the end (or early stop), resuming from the latest checkpoint if asked."""
        with self.running():
            return self._run(resume)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The model as training runs it: fused ops on (``training.fused_ops``) and, for packed
        rows or SFT micro-batches under SDPA, per-sample attention (tuneforge.accel.attention); both
        undone on exit.
        ``run`` trains inside it; a caller stepping by hand (``train_step``) must too."""
        with fused_ops(self.model, self.cfg.fused_ops), self.plan.attention_for(self.model):
            yield

    def _run(self, resume: bool = False) -> LoopResult:
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
            "skipped_steps": 0,
            "bad_steps_in_row": 0,
        }
        best_state = None
        if resume:
            ckpts = list_checkpoints(ckpt_root)
            if ckpts:
                state, best_state = load_checkpoint(
                    ckpts[-1], self.model, self.optimizer, self.scheduler, rank=self.dist.rank
                )
                self.scaler.load_state_dict(state.pop("grad_scaler", None))
                if best_state is None and state["best_step"] == state["global_step"]:
                    # the checkpoint's own weights are the best so far (no best.safetensors)
                    best_state = trainable_state(self.model)
                if self.dist.is_main:
                    _truncate_metrics(metrics_path, state["global_step"])
        keeper = BestKeeper(
            self.model, state, "best_eval_loss", cfg.early_stopping_patience, best_state=best_state
        )
        if self.guard is not None and self.guard.max_kl is not None:
            if state["best_step"] is None and keeper.best_state is None:
                # the weights to keep if no evaluation is within max_kl: the start's
                keeper.best_state = trainable_state(self.model)
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=state["global_step"],
            disable=not cfg.progress or not self.dist.is_main,
            file=sys.stderr,
            dynamic_ncols=True,
            desc="train",
        )
        start = time.perf_counter()
        stopped_early = bool(state.get("stopped_early"))
        last_loss = None
        first_step = self.total_steps if stopped_early else state["global_step"]
        main = self.dist.is_main
        say = bar.write if main else (lambda msg: None)  # tqdm.write ignores disable=
        with open(metrics_path if main else os.devnull, "a") as metrics:
            for step in range(first_step, self.total_steps):
                t0 = time.perf_counter()
                out = self.train_step(step)
                dt = time.perf_counter() - t0
                state["global_step"] = step + 1
                state["supervised_tokens"] += out["tokens"]
                if out.get("overflow"):
                    state["skipped_steps"] = state.get("skipped_steps", 0) + 1
                    say(
                        f"step {step + 1}: float16 gradients overflowed; update skipped, loss "
                        f"scale lowered to {self.scaler.scale:g}"
                    )
                elif out.get("skipped"):
                    state["skipped_steps"] = state.get("skipped_steps", 0) + 1
                    state["bad_steps_in_row"] = state.get("bad_steps_in_row", 0) + 1
                    say(f"step {step + 1}: non-finite loss or gradient; update skipped")
                else:
                    state["bad_steps_in_row"] = 0
                    last_loss = out["loss"]
                record = {
                    "step": step + 1,
                    "epoch": round((step + 1) / self.steps_per_epoch, 4),
                    **{k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()},
                    "tokens_per_s": round(out["tokens"] / dt, 1),
                }
                if (step + 1) % cfg.logging_steps == 0 or step + 1 == self.total_steps:
                    log_record(metrics, self.loggers, record)
                if state["bad_steps_in_row"] >= cfg.max_bad_steps:
                    metrics.flush()
                    bar.close()
                    done = list_checkpoints(ckpt_root)
                    keep = (
                        f"the last good checkpoint is {done[-1]}"
                        if done
                        else "no checkpoint was written"
                    )
                    raise TuneforgeError(
                        f"training diverged: {state['bad_steps_in_row']} steps in a row (up to step "
                        f"{step + 1}) had a non-finite loss or gradient norm; {keep}. Lower "
                        "training.learning_rate or set training.max_grad_norm, then --resume"
                    )
                bar.set_postfix(
                    loss=f"{out['loss']:.4f}",
                    lr=f"{out['lr']:.2e}",
                    tok_s=f"{out['tokens'] / dt:.0f}",
                )
                bar.update(1)
                evaluated = over_kl = False
                if self._eval_due(step + 1):
                    evaluated = True
                    stopped_early, over_kl = self._eval_step(step + 1, keeper, metrics, say)
                metrics.flush()
                # SIGTERM (run_status.py): a checkpoint now, then stop (one process only: the
                # ranks of several would disagree on the step)
                stopping = not self.dist.enabled and stop_requested()
                save = self._save_due(step + 1, evaluated) or stopped_early or stopping
                # never checkpoint inside a bad streak (an overflow is not one)
                if save and (not out.get("skipped") or out.get("overflow")):
                    rng = self.dist.gather_objects(rng_state())
                    best = keeper.for_checkpoint(step + 1)
                    full = self._gather_for_checkpoint(best)
                    if main:
                        save_checkpoint(
                            ckpt_root,
                            step + 1,
                            self.model,
                            self.optimizer,
                            self.scheduler,
                            {
                                **state,
                                "stopped_early": stopped_early,
                                "grad_scaler": self.scaler.state_dict(),
                            },
                            full.get("best", best),
                            cfg.save_total_limit,
                            rng_states=rng,
                            weights=full.get("weights"),
                            optimizer_state=full.get("optimizer"),
                        )
                if stopping:
                    raise KeyboardInterrupt("stopped by SIGTERM after a checkpoint")
                if stopped_early:
                    if not over_kl:
                        say(
                            f"early stopping: no eval improvement in {cfg.early_stopping_patience} evaluations"
                        )
                    break
        bar.close()
        for logger in self.loggers:
            logger.close()
        keeper.restore_best()  # keep the best weights
        return LoopResult(
            global_step=state["global_step"],
            total_steps=self.total_steps,
            stopped_early=stopped_early,
            best_step=state["best_step"],
            best_eval_loss=state["best_eval_loss"],
            last_train_loss=last_loss,
            eval_history=[tuple(x) for x in state["eval_history"]],
            seconds=time.perf_counter() - start,
            skipped_steps=state.get("skipped_steps", 0),
            supervised_tokens=state["supervised_tokens"],
            best_eval_metrics=state.get("best_eval_metrics", {}),
        )

    def _eval_step(self, step: int, keeper: BestKeeper, metrics, say) -> tuple[bool, bool]:
        """Evaluate after ``step``: the eval loss and metrics, the guard's readings and warnings,
        the best weights so far; returns (stop now, the guard's ``max_kl`` was passed)."""
        state = keeper.state
        eval_loss = self.evaluate()
        readings, over_kl = {}, False
        if self.guard is not None:
            with self.autocast():
                readings = self.guard.measure()
            self.last_eval_metrics.update(readings)
            over_kl = self.guard.over_limit(readings)
        stop = keeper.update(step, eval_loss, self.last_eval_metrics, eligible=not over_kl)
        eval_metrics = {f"eval_{k}": round(v, 6) for k, v in self.last_eval_metrics.items()}
        record = {"step": step, "eval_loss": round(eval_loss, 6), **eval_metrics}
        log_record(metrics, self.loggers, {**record, "best_step": state["best_step"]})
        best = state["best_eval_loss"]
        say(
            f"step {step}: eval_loss {eval_loss:.4f} "
            + (
                f"(best {best:.4f} at step {state['best_step']})"
                if best is not None
                else "(none within training.max_kl)"
            )
        )
        for line in self.guard.warnings(step, readings) if readings else ():
            say(line)
        if "logps_chosen" in self.last_eval_metrics and not self.displacement_warned:
            self.chosen_logps.append(self.last_eval_metrics["logps_chosen"])
            warning = displacement_warning(self.chosen_logps)
            if warning:
                say(warning)
                self.displacement_warned = True
        if over_kl:
            kept = state["best_step"]
            say(
                f"stopping: the held-out answers' KL to the starting model "
                f"({readings['guard_kl']:.2f} nats) passed training.max_kl ({self.cfg.max_kl:g}) "
                f"at step {step}; keeping the weights of "
                + (f"step {kept}" if kept else "the start (no evaluation was within it)")
            )
        return stop or over_kl, over_kl

    def _gather_for_checkpoint(self, best: dict | None) -> dict:
        """FSDP2: the full weights, optimizer state and best weights, gathered onto rank 0
        (every rank must call this); ``{}`` when the model is not sharded."""
        if not self.sharded:
            return {}
        full = {
            "weights": full_weights(self.model),
            "optimizer": full_optimizer_state(self.model, self.optimizer),
        }
        if best is not None:
            full["best"] = gather_full(best)
        return full


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    keep = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
    ]
    path.write_text("".join(ln + "\n" for ln in keep))
