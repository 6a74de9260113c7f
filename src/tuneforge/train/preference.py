"""``train(config)`` for the pairwise objectives (reward, dpo): the same loop as SFT, fed pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneforge.config import Config, dump_config
from tuneforge.data.preference import PairStats, collate_pairs, prepare_preference_data
from tuneforge.methods import apply_method, describe_trainable
from tuneforge.models import load_model, pick_device
from tuneforge.train import (
    _log,
    _summary,
    check_run_dir,
    prepare_for_speed,
    save_trained,
    seed_everything,
)
from tuneforge.train.dpo import DPOObjective, precompute_reference_logps
from tuneforge.train.loop import Trainer
from tuneforge.train.reward import RewardModel, RewardObjective


def describe_pairs(kind: str, n: int, stats: PairStats, max_length: int) -> str:
    parts = [f"{n} {kind} pairs"]
    if stats.truncated:
        parts.append(f"{stats.truncated} truncated to {max_length} tokens")
    if stats.dropped_no_labels:
        parts.append(
            f"{stats.dropped_no_labels} dropped (prompt fills data.max_length={max_length}, "
            f"first: {stats.dropped_sources[0]})"
        )
    if stats.dropped_identical:
        parts.append(f"{stats.dropped_identical} dropped (responses identical within max_length)")
    return "; ".join(parts)


def train_pairs(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a reward model or a DPO policy as ``cfg`` says; returns the run summary.

    Data, model and method problems are reported before the run folder is touched.
    """
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume, overwrite)
    t = cfg.training
    seed_everything(t.seed)
    lm, tokenizer, resolved = load_model(cfg.model, t.dtype, t.device, cfg.trust_remote_code)
    data = prepare_preference_data(cfg.data, tokenizer, t.seed)
    lm.config.use_cache = False
    lm = apply_method(lm, cfg.method, tokenizer)
    prepare_for_speed(lm, t)
    _log(
        "data: "
        + describe_pairs("training", len(data.train), data.train_stats, cfg.data.max_length)
    )
    if data.eval or data.eval_stats.rendered:
        _log(
            "data: " + describe_pairs("eval", len(data.eval), data.eval_stats, cfg.data.max_length)
        )
    device = pick_device(t.device)
    if t.objective == "reward":
        model = RewardModel(lm)
        objective = RewardObjective()
    else:
        model = lm
        objective = DPOObjective(t.beta, t.loss_type)
        adapter = cfg.method.name != "full"
        if not adapter or t.precompute_reference:
            # Before the loop restores any checkpoint: the reference is the starting model.
            for pairs in (data.train, data.eval):
                precompute_reference_logps(
                    model, pairs, tokenizer.pad_token_id, t.batch_size, device, adapter
                )
    _log(describe_trainable(model))

    if overwrite and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    trainer = Trainer(
        model,
        objective,
        data.train,
        data.eval,
        t,
        run_dir,
        tokenizer.pad_token_id,
        device,
        collate=lambda pairs: collate_pairs(pairs, tokenizer.pad_token_id),
        group_by_length=cfg.data.group_by_length,
    )
    result = trainer.run(resume=resume)
    save_trained(lm, tokenizer, cfg, run_dir)
    if t.objective == "reward":
        model.save_head(run_dir)
    summary = _summary(cfg, result, data, model, resolved)
    summary["objective"] = t.objective
    summary["pairs_dropped_identical"] = data.train_stats.dropped_identical
    summary["best_eval_metrics"] = result.best_eval_metrics
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(run_dir / "summary.json")
    m = result.best_eval_metrics
    acc = m.get("accuracy", m.get("rewards_accuracy"))
    _log(
        f"saved {run_dir}"
        + (
            f" (held-out pairwise accuracy {acc:.1%} at step {result.best_step})"
            if acc is not None
            else ""
        )
    )
    return summary
