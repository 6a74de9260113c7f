"""The pairwise objectives (reward, dpo, orpo, simpo): the run skeleton and loop SFT uses, fed
pairs."""

from __future__ import annotations

from tuneforge.data.preference import PairStats, collate_pairs, prepare_preference_data
from tuneforge.methods import trains_adapter
from tuneforge.train.dpo import DPOObjective, precompute_reference_logps
from tuneforge.train.ref_free import ReferenceFreeObjective
from tuneforge.train.reward import RewardModel, RewardObjective
from tuneforge.train.run import ObjectiveRun, loop_summary, pair_loop


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


class PairRun(ObjectiveRun):
    """Reward modelling, DPO, ORPO or SimPO in the run skeleton (train/run.py): preference
    records, pairs of samples, the shared loop with a pair collate."""

    multi_process = True

    def __init__(self, name: str):
        self.name = name

    def prepare_data(self, cfg, tokenizer, lm):
        return prepare_preference_data(cfg.data, tokenizer, cfg.training.seed)

    def describe_data(self, cfg, data) -> list[str]:
        n = cfg.data.max_length
        lines = ["data: " + describe_pairs("training", len(data.train), data.train_stats, n)]
        if data.eval or data.eval_stats.rendered:
            lines.append("data: " + describe_pairs("eval", len(data.eval), data.eval_stats, n))
        return lines

    def wrap(self, ctx, data):
        if self.name == "reward":
            return RewardModel(ctx.lm)
        if self.name != "dpo":  # orpo, simpo: no reference model
            return ctx.lm
        t = ctx.cfg.training
        adapter = trains_adapter(ctx.cfg.method)
        if not adapter or t.precompute_reference:
            # Before the loop restores any checkpoint: the reference is the starting model,
            # computed as the loop computes the policy (autocast), so they agree at step 0.
            for pairs in (data.train, data.eval):
                with ctx.precision.autocast():
                    precompute_reference_logps(
                        ctx.lm, pairs, ctx.tokenizer.pad_token_id, t.batch_size, ctx.device, adapter
                    )
        return ctx.lm

    def fit(self, ctx, model, data):
        t = ctx.cfg.training
        pad = ctx.tokenizer.pad_token_id
        if self.name == "reward":
            objective = RewardObjective()
        elif self.name == "dpo":
            objective = DPOObjective(t.beta, t.loss_type, t.rpo_alpha)
        else:
            objective = ReferenceFreeObjective(self.name, t.beta, t.simpo_gamma, t.cpo_alpha)
        return pair_loop(ctx, model, data, objective, lambda pairs: collate_pairs(pairs, pad))

    def save_extra(self, ctx, model, weights) -> None:
        if self.name == "reward":
            model.save_head(ctx.run_dir, weights)

    def summary(self, ctx, result, data) -> dict:
        return {
            **loop_summary(result, data),
            "pairs_dropped_identical": data.train_stats.dropped_identical,
            "best_eval_metrics": result.best_eval_metrics,
        }

    def finished(self, ctx, result) -> str:
        m = result.best_eval_metrics
        acc = m.get("accuracy", m.get("rewards_accuracy"))
        return f"saved {ctx.run_dir}" + (
            f" (held-out pairwise accuracy {acc:.1%} at step {result.best_step})"
            if acc is not None
            else ""
        )
