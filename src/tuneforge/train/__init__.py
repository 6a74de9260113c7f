"""``train(config)``: load, prepare data, apply the method, run the loop, save the result."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tuneforge import kernels
from tuneforge.config import Config, dump_config
from tuneforge.data.dataset import prepare_sft_data
from tuneforge.errors import TuneforgeError
from tuneforge.methods import apply_method, describe_trainable, trainable_parameters
from tuneforge.models import load_model, pick_device, weights_dtype
from tuneforge.train.checkpoint import list_checkpoints
from tuneforge.train.distributed import init_from_env, shutdown
from tuneforge.train.loop import LoopResult, Trainer
from tuneforge.train.memory import allocator, return_freed_memory
from tuneforge.train.sft import SFTObjective
from tuneforge.train.tensorboard import make_loggers


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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train(cfg: Config, resume: bool = False, overwrite: bool = False, objective=None) -> dict:
    """Fine-tune ``cfg.model`` as configured; returns the run summary (also saved as summary.json).

    Everything that can fail because of the user's input (config, model reference, data) is checked
    before the run folder is created or changed. Under torchrun / ``--nproc`` every rank runs this;
    only rank 0 writes.
    """
    return_freed_memory()  # glibc: freed tensors go back to the system (train/memory.py)
    if cfg.training.objective != "sft" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TuneforgeError(
            f"training.objective: {cfg.training.objective} runs in one process only; "
            "drop --nproc / torchrun (multi-process training covers objective sft)"
        )
    if objective is None and cfg.training.objective in ("reward", "dpo"):
        from tuneforge.train.preference import train_pairs

        return train_pairs(cfg, resume=resume, overwrite=overwrite)
    if objective is None and cfg.training.objective == "ppo":
        from tuneforge.train.ppo import train_ppo

        return train_ppo(cfg, resume=resume, overwrite=overwrite)
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume, overwrite)
    t = cfg.training
    device = pick_device(t.device)
    dist = init_from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device(f"cuda:{dist.local_rank}")
    log = _log if dist.is_main else (lambda msg: None)
    try:
        if dist.enabled and cfg.method.name == "full":
            check_fsdp_optimizer(t, device)
        seed_everything(t.seed)
        load = load_model
        if cfg.method.name == "qlora":  # the frozen base in 4 bits (bitsandbytes)
            from tuneforge.methods.quantize import load_quantized_model

            load = partial(load_quantized_model, method=cfg.method)
        model, tokenizer, resolved = load(
            cfg.model, t.dtype, str(device), cfg.trust_remote_code, t.attn_implementation
        )
        data = prepare_sft_data(cfg.data, tokenizer, t.seed, model=model)
        model.config.use_cache = False
        model = apply_method(model, cfg.method, tokenizer)
        prepare_for_speed(model, t)
        sharded = dist.enabled and cfg.method.name == "full"
        if sharded:  # FSDP2: weights, gradients and optimizer state sharded across the ranks
            from tuneforge.train.fsdp import shard_model

            shard_model(model, dist, device)
        st = data.train_stats
        log(
            f"data: {len(data.train)} training samples, {len(data.eval)} eval samples"
            + (
                f"; {st.truncated} truncated to {cfg.data.max_length} tokens"
                if st.truncated
                else ""
            )
            + (
                f"; {st.dropped_no_labels} dropped (no supervised token within max_length)"
                if st.dropped_no_labels
                else ""
            )
        )
        log(
            describe_trainable(model)
            + (f"; {dist.world} processes" if dist.enabled else "")
            + (" (FSDP2: parameters sharded)" if sharded else "")
        )
        if t.report_to == "tensorboard":  # fail before the run folder is touched
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise TuneforgeError(
                    "training.report_to is tensorboard but the tensorboard package is not "
                    "installed; pip install 'tuneforge[tensorboard]' or set training.report_to: none"
                ) from None
        if dist.is_main:
            if overwrite and not resume and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")
            loggers = make_loggers(t.report_to, run_dir)
        else:
            loggers = []
        dist.barrier()
        trainer = Trainer(
            model,
            objective or SFTObjective(),
            data.train,
            data.eval,
            t,
            run_dir,
            tokenizer.pad_token_id,
            device,
            packing=cfg.data.packing,
            max_length=cfg.data.max_length,
            group_by_length=cfg.data.group_by_length,
            dist=dist,
            loggers=loggers,
        )
        result = trainer.run(resume=resume)
        summary = _summary(cfg, result, data, model, resolved)
        full = None
        if sharded:  # gathered onto rank 0; every rank joins
            from tuneforge.train.fsdp import full_weights

            full = full_weights(model, trainable_only=False)
        if dist.is_main:
            save_trained(model, tokenizer, cfg, run_dir, state_dict=full)
            tmp = run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(run_dir / "summary.json")
        dist.barrier()
    finally:
        shutdown(dist)
    log(
        f"saved {run_dir / ('model' if cfg.method.name == 'full' else 'adapter')}"
        + (
            f" (best eval loss {result.best_eval_loss:.4f} at step {result.best_step})"
            if result.best_step
            else ""
        )
    )
    return summary


def check_fsdp_optimizer(t, device: torch.device) -> None:
    """FSDP2 needs an optimizer that updates DTensor shards: torch AdamW, not bitsandbytes'."""
    from tuneforge.train.optimizers import effective_optimizer

    if effective_optimizer(t.optimizer, device)[0] != "adamw":
        raise TuneforgeError(
            f"training.optimizer {t.optimizer} cannot update the sharded weights of full "
            "fine-tuning on several processes (FSDP2); set training.optimizer: adamw, or run "
            "in one process"
        )


def prepare_for_speed(model: torch.nn.Module, t) -> None:
    """Gradient checkpointing (non-reentrant, so frozen inputs need no grad hack) and compile."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if t.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.compile:
        for layer in base.get_decoder().layers:
            layer.compile(dynamic=True)


def save_trained(
    model, tokenizer, cfg: Config, run_dir: Path, state_dict: dict | None = None
) -> Path:
    """Save the adapter (PEFT format) or the full model (HF folder), with the tokenizer, atomically.

    ``state_dict``: the full weights of a model sharded across ranks (FSDP2), gathered on rank 0.
    """
    name = "model" if cfg.method.name == "full" else "adapter"
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is None:
        model.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _summary(cfg: Config, r: LoopResult, data, model, resolved: str) -> dict:
    trainable, total = trainable_parameters(model)
    malloc = allocator()
    return {
        "model": cfg.model,
        "resolved_model": resolved,
        "method": cfg.method.name,
        # the dtype the base was loaded (and, for qlora, quantized) from: merge re-loads it so
        "base_dtype": str(weights_dtype(model)).removeprefix("torch."),
        "steps": r.global_step,
        "total_steps": r.total_steps,
        "stopped_early": r.stopped_early,
        "best_step": r.best_step,
        "best_eval_loss": r.best_eval_loss,
        "last_train_loss": r.last_train_loss,
        "eval_history": r.eval_history,
        "train_samples": len(data.train),
        "eval_samples": len(data.eval),
        "truncated": data.train_stats.truncated,
        "dropped_no_supervised_tokens": data.train_stats.dropped_no_labels,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_seconds_this_process": round(r.seconds, 2),
        "supervised_tokens": r.supervised_tokens,
        "skipped_steps": r.skipped_steps,
        "malloc": malloc,  # jemalloc when `tuneforge train` found it (train/memory.py)
        "malloc_conf": os.environ.get("MALLOC_CONF") if malloc == "jemalloc" else None,
        "cpu_kernels": kernels.loaded(),  # the fused CPU kernels ran (tuneforge/kernels)
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
