"""The run skeleton every objective goes through, written once.

check the run folder -> seed -> load the base through the method -> the data pipeline -> apply
the method -> speed set-up -> the objective's model wrapper -> open the run folder and loggers
-> the loop -> save -> summary.

An objective (``ObjectiveRun``: sft.py, preference.py, ppo.py) supplies only what differs: how
its records become training items, the model wrapper (reward head, value head), the loop that
fits it, what it saves beside the weights, and its summary fields. Everything a user can get
wrong (config, model reference, data, optional packages) is checked before the run folder is
created or changed. Under torchrun / ``--nproc`` every rank runs this; only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tuneforge import run_status
from tuneforge.accel import kernels
from tuneforge.accel.memory import allocator, return_freed_memory
from tuneforge.config import Config, dump_config
from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_folder, write_atomic
from tuneforge.methods import (
    apply_method,
    describe_trainable,
    load_base,
    saved_folder,
    trainable_parameters,
    trains_adapter,
    unwrap,
)
from tuneforge.models import pick_device
from tuneforge.train.checkpoint import list_checkpoints
from tuneforge.train.distributed import Dist, init_from_env, shutdown
from tuneforge.train.loop import LoopResult
from tuneforge.train.precision import Precision
from tuneforge.train.tensorboard import make_loggers


@dataclass
class RunContext:
    """What the skeleton has set up, handed to the objective's steps."""

    cfg: Config
    run_dir: Path
    device: torch.device
    dist: Dist
    tokenizer: object
    lm: torch.nn.Module  # the base with the method applied (what save_trained saves)
    precision: Precision  # compute dtype, master weights, loss scaling (train/precision.py)
    resume: bool = False
    loggers: list = field(default_factory=list)


class ObjectiveRun:
    """What one training objective supplies to ``run``; see the module docstring."""

    # Several processes (``--nproc``): data-parallel adapters, FSDP2-sharded full fine-tuning.
    multi_process = False

    def prepare_data(self, cfg: Config, tokenizer, lm: torch.nn.Module):
        """Records -> the objective's training and eval items (raises a user's data errors)."""
        raise NotImplementedError

    def describe_data(self, cfg: Config, data) -> list[str]:
        """One-line notes on the prepared data, printed before training."""
        return []

    def wrap(self, ctx: RunContext, data) -> torch.nn.Module:
        """The model the loop trains (the LM, or the LM with a reward / value head)."""
        return ctx.lm

    def fit(self, ctx: RunContext, model: torch.nn.Module, data) -> LoopResult:
        raise NotImplementedError

    def save_extra(
        self, ctx: RunContext, model: torch.nn.Module, weights: dict[str, torch.Tensor] | None
    ) -> None:
        """Files beside the adapter / model folder (a reward or value head). ``weights``: when
        the model was sharded, the full tensors of ``model``'s own parameters outside the LM (by
        name in ``model``), gathered on rank 0; None otherwise."""

    def summary(self, ctx: RunContext, result: LoopResult, data) -> dict:
        """The objective's own summary.json fields."""
        return {}

    def finished(self, ctx: RunContext, result: LoopResult) -> str:
        """The last line printed."""
        return f"saved {ctx.run_dir / saved_folder(ctx.cfg.method)}"


def pair_loop(ctx: RunContext, model, data, objective, collate) -> LoopResult:
    """The shared loop over items that a custom ``collate`` batches (pairs, labelled
    completions), as the objectives other than sft run it."""
    from tuneforge.train.guards import make_guard
    from tuneforge.train.loop import Trainer

    trainer = Trainer(
        model,
        objective,
        data.train,
        data.eval,
        ctx.cfg.training,
        ctx.run_dir,
        ctx.tokenizer.pad_token_id,
        ctx.device,
        collate=collate,
        group_by_length=ctx.cfg.data.group_by_length,
        dist=ctx.dist,
        loggers=ctx.loggers,
        guard=make_guard(ctx, data),
    )
    return trainer.run(resume=ctx.resume)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless asked; refuse to resume nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TuneforgeError(f"output_dir '{run_dir}' is a file; choose a folder path")
    has_content = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not list_checkpoints(run_dir / "checkpoints"):
            raise TuneforgeError(
                f"output_dir '{run_dir}' has no checkpoint to resume from; drop --resume to start fresh"
            )
    elif has_content and not overwrite:
        raise TuneforgeError(
            f"output_dir '{run_dir}' already exists; pass --overwrite to replace it or --resume to continue it"
        )


def check_processes(cfg: Config, objective: ObjectiveRun, world: int) -> None:
    """Refuse, in one line, a multi-process run the objective cannot do."""
    if world <= 1:
        return
    name = cfg.training.objective
    if not objective.multi_process:
        raise TuneforgeError(
            f"--nproc: training.objective {name} runs in one process only; multi-process "
            "training covers objectives sft, reward, dpo, orpo and simpo"
        )


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(
    cfg: Config,
    objective: ObjectiveRun,
    resume: bool = False,
    overwrite: bool = False,
    loggers: list | None = None,
):
    """Train ``cfg`` with ``objective``; returns the run summary (also saved as summary.json)."""
    return_freed_memory()  # glibc: freed tensors go back to the system (accel/memory.py)
    check_processes(cfg, objective, int(os.environ.get("WORLD_SIZE", "1")))
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume, overwrite)
    t = cfg.training
    device = pick_device(t.device)
    dist = init_from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device(f"cuda:{dist.local_rank}")
    say = log if dist.is_main else (lambda msg: None)
    # made now so a missing package fails before the run folder is touched; they write nothing
    # before the first record (only rank 0 logs)
    extra = list(loggers or [])
    loggers = make_loggers(cfg.training.report_to, run_dir) + extra if dist.is_main else []
    marked = False  # status.json written (rank 0, once the run folder exists)
    try:
        sharded = dist.enabled and not trains_adapter(cfg.method)
        if sharded:
            check_fsdp_optimizer(t, device)
        seed_everything(t.seed)
        lm, tokenizer, resolved = load_base(cfg, device)
        data = objective.prepare_data(cfg, tokenizer, lm)
        lm.config.use_cache = False
        lm = apply_method(lm, cfg.method, tokenizer)
        prepare_for_speed(lm, t)
        precision = Precision.of(t, device)
        ctx = RunContext(cfg, run_dir, device, dist, tokenizer, lm, precision, resume)
        model = objective.wrap(ctx, data)
        precision.keep_master_weights(model)  # adapters, heads: float32 under bf16 / fp16
        if sharded:  # FSDP2: weights, gradients and optimizer state sharded across the ranks
            from tuneforge.train.fsdp import shard_model

            shard_model(model, dist, device, layers=lm.get_decoder().layers)
        for line in objective.describe_data(cfg, data):
            say(line)
        say(
            describe_trainable(model)
            + (f"; {dist.world} processes" if dist.enabled else "")
            + (" (FSDP2: parameters sharded)" if sharded else "")
        )
        if dist.is_main:
            if overwrite and not resume and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")
            run_status.mark(run_dir, run_status.RUNNING)
            marked = True
            ctx.loggers = loggers
        dist.barrier()
        result = objective.fit(ctx, model, data)
        summary = {
            **common_summary(cfg, result, model, resolved, precision),
            **objective.summary(ctx, result, data),
        }
        lm_weights = extra_weights = None
        if sharded:  # gathered onto rank 0; every rank joins
            from tuneforge.train.fsdp import full_weights

            lm_weights, extra_weights = split_lm_weights(
                model, lm, full_weights(model, trainable_only=False)
            )
        if dist.is_main:
            summary["advice"] = training_advice(cfg, run_dir, result)
            save_trained(lm, tokenizer, cfg, run_dir, lm_weights, precision)
            objective.save_extra(ctx, model, extra_weights)
            write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
            run_status.mark(run_dir, run_status.FINISHED)
        dist.barrier()
    except KeyboardInterrupt:  # Ctrl-C, SIGINT, SIGTERM (cli/train.py): --resume continues it
        if marked:
            run_status.mark(run_dir, run_status.STOPPED)
        raise
    except Exception as e:
        if marked:
            run_status.mark(run_dir, run_status.CRASHED, f"{type(e).__name__}: {e}")
        raise
    finally:
        shutdown(dist)
    say(objective.finished(ctx, result))
    for line in summary.get("advice", ()):
        say(line)
    return summary


def training_advice(cfg: Config, run_dir: Path, result: LoopResult) -> list[str]:
    """What the run's own loss curves say to change (eval/advice.py); rank 0, after training."""
    from tuneforge.eval.advice import advice
    from tuneforge.eval.overfitting import read_curves

    curves = read_curves(run_dir)
    # the loop's own record: summary.json, which read_curves consults, is not written yet
    curves.best_step, curves.stopped_early = result.best_step, result.stopped_early
    t = cfg.training
    return advice(curves, t.early_stopping_patience, objective=t.objective)


def split_lm_weights(model: torch.nn.Module, lm: torch.nn.Module, weights: dict) -> tuple:
    """(the LM's weights by its own names, the rest by ``model``'s names) from ``model``'s."""
    if model is lm:
        return weights, {}
    prefix = next(name for name, m in model.named_modules() if m is lm) + "."
    inside = {n.removeprefix(prefix): t for n, t in weights.items() if n.startswith(prefix)}
    return inside, {n: t for n, t in weights.items() if not n.startswith(prefix)}


def check_fsdp_optimizer(t, device: torch.device) -> None:
    """FSDP2 needs an optimizer that updates DTensor shards: torch AdamW, not bitsandbytes';
    and no float16 loss scaling, whose overflow check would be each rank's own."""
    from tuneforge.train.optimizers import effective_optimizer

    if t.dtype == "float16":
        raise TuneforgeError(
            "training.dtype float16 cannot scale the loss of full fine-tuning sharded across "
            "processes (FSDP2: each rank would see its own overflows); set training.dtype: "
            "bfloat16, or run in one process"
        )

    if effective_optimizer(t.optimizer, device)[0] != "adamw":
        raise TuneforgeError(
            f"training.optimizer {t.optimizer} cannot update the sharded weights of full "
            "fine-tuning on several processes (FSDP2); set training.optimizer: adamw, or run "
            "in one process"
        )


def prepare_for_speed(model: torch.nn.Module, t) -> None:
    """Gradient checkpointing (non-reentrant, so frozen inputs need no grad hack) and compile."""
    base = unwrap(model)
    if t.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.compile:
        for layer in base.get_decoder().layers:
            layer.compile(dynamic=True)


def save_trained(
    model,
    tokenizer,
    cfg: Config,
    run_dir: Path,
    state_dict: dict | None = None,
    precision: Precision | None = None,
) -> Path:
    """Save the adapter (PEFT format) or the full model (HF folder), with the tokenizer, atomically.

    ``state_dict``: the full weights of a model sharded across ranks (FSDP2), gathered on rank 0.
    A full model trained with float32 master weights is saved in the compute dtype.
    """
    final = run_dir / saved_folder(cfg.method)
    cast = precision is not None and not trains_adapter(cfg.method)
    if cast:
        state_dict = precision.saved_weights(model, state_dict)
    with atomic_folder(final) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)  # None: the model's own
        tokenizer.save_pretrained(tmp)
        if cast:  # config.json names the dtype of the model's parameters, not of the file's
            config = json.loads((tmp / "config.json").read_text())
            config["dtype"] = precision.dtype_name
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return final


def common_summary(cfg: Config, r: LoopResult, model, resolved: str, precision: Precision) -> dict:
    """The summary.json fields every objective writes."""
    trainable, total = trainable_parameters(model)
    malloc = allocator()
    return {
        "model": cfg.model,
        "resolved_model": resolved,
        "objective": cfg.training.objective,
        "method": cfg.method.name,
        # the dtype the base was loaded (and, for qlora, quantized) from: merge re-loads it so;
        # a full model is saved in it
        "base_dtype": str(precision.compute).removeprefix("torch."),
        "master_weights": precision.half and precision.master,
        "steps": r.global_step,
        "total_steps": r.total_steps,
        "stopped_early": r.stopped_early,
        "best_step": r.best_step,
        "eval_history": r.eval_history,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_seconds_this_process": round(r.seconds, 2),
        "malloc": malloc,  # jemalloc when `tuneforge train` found it (accel/memory.py)
        "malloc_conf": os.environ.get("MALLOC_CONF") if malloc == "jemalloc" else None,
        "cpu_kernels": kernels.loaded(),  # the fused CPU kernels ran (tuneforge/accel/kernels)
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def loop_summary(r: LoopResult, data) -> dict:
    """The summary fields of the objectives that run the shared loop over samples."""
    return {
        "best_eval_loss": r.best_eval_loss,
        "last_train_loss": r.last_train_loss,
        "train_samples": len(data.train),
        "eval_samples": len(data.eval),
        "truncated": data.train_stats.truncated,
        "dropped_no_supervised_tokens": data.train_stats.dropped_no_labels,
        "supervised_tokens": r.supervised_tokens,
        "skipped_steps": r.skipped_steps,
    }
