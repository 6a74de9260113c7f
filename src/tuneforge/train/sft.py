"""Supervised fine-tuning: next-token cross-entropy on assistant tokens only."""

from __future__ import annotations

import torch

from tuneforge.data.batching import supervised_tokens
from tuneforge.losses import causal_lm_loss_sum, selective_lm_loss_sum
from tuneforge.methods import saved_folder, unwrap
from tuneforge.methods.peft_methods import is_prompt_learning, virtual_token_count
from tuneforge.methods.quantize_embed import QuantizedHead, head_weight
from tuneforge.methods.virtual_packing import is_packed, packed_forward
from tuneforge.train.loop import Trainer
from tuneforge.train.policy import head_is_sharded
from tuneforge.train.run import ObjectiveRun, loop_summary


class SFTObjective:
    """Turns a batch into a summed token loss; the loop normalises by supervised tokens.

    Args:
        selective: apply the LM head only where a label is supervised, chunked (same numbers as
            the plain path, no (B, T, V) logits tensor). Falls back to the plain path for heads
            it cannot reproduce exactly (biased, adapted or soft-capped heads).
    """

    name = "sft"

    def __init__(self, selective: bool = True, chunk_size: int = 1024):
        self.selective = selective
        self.chunk_size = chunk_size

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return supervised_tokens(batch)

    def _can_select(self, base: torch.nn.Module) -> bool:
        head = base.get_output_embeddings()
        cfg = base.config
        return (
            self.selective
            and type(head) in (torch.nn.Linear, QuantizedHead)
            and not head_is_sharded(base)
            and head.bias is None
            and not getattr(cfg, "final_logit_softcapping", None)
            and getattr(cfg, "logit_scale", None) in (None, 1.0)
            and hasattr(base, "get_decoder")
        )

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        base = unwrap(model)
        if is_prompt_learning(model) and is_packed(batch):  # methods/virtual_packing.py
            if self._can_select(base):
                hidden = packed_forward(model, inputs, hidden_only=True)  # (B, T, C)
                weight = head_weight(base.get_output_embeddings())
                return selective_lm_loss_sum(hidden, weight, batch["labels"], self.chunk_size)
            return causal_lm_loss_sum(packed_forward(model, inputs), batch["labels"])
        # Prefix / prompt tuning add their virtual tokens in the peft wrapper, which the direct
        # decoder call would skip: they take the plain path.
        if self._can_select(base) and not is_prompt_learning(model):
            hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, C)
            head = base.get_output_embeddings()
            weight = head_weight(head)
            return selective_lm_loss_sum(hidden, weight, batch["labels"], self.chunk_size)
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        # Prompt tuning returns logits for its virtual tokens first: (B, n_virtual + T, V).
        logits = logits[:, virtual_token_count(model) :]
        return causal_lm_loss_sum(logits, batch["labels"])


# -- the run -------------------------------------------------------------------------------------
class SFTRun(ObjectiveRun):
    """Supervised fine-tuning in the run skeleton (train/run.py): instruction / chat records,
    rendered samples, the shared loop with packing."""

    multi_process = True

    def __init__(self, loss=None):
        self.loss = loss or SFTObjective()

    def prepare_data(self, cfg, tokenizer, lm):
        from tuneforge.data.dataset import prepare_sft_data

        return prepare_sft_data(cfg.data, tokenizer, cfg.training.seed, model=lm)

    def describe_data(self, cfg, data) -> list[str]:
        st = data.train_stats
        line = f"data: {len(data.train)} training samples, {len(data.eval)} eval samples"
        if st.truncated:
            line += f"; {st.truncated} truncated to {cfg.data.max_length} tokens"
        if st.dropped_no_labels:
            line += f"; {st.dropped_no_labels} dropped (no supervised token within max_length)"
        return [line]

    def fit(self, ctx, model, data):
        cfg = ctx.cfg
        trainer = Trainer(
            model,
            self.loss,
            data.train,
            data.eval,
            cfg.training,
            ctx.run_dir,
            ctx.tokenizer.pad_token_id,
            ctx.device,
            packing=cfg.data.packing,
            max_length=cfg.data.max_length,
            group_by_length=cfg.data.group_by_length,
            dist=ctx.dist,
            loggers=ctx.loggers,
        )
        return trainer.run(resume=ctx.resume)

    def summary(self, ctx, result, data) -> dict:
        return loop_summary(result, data)

    def finished(self, ctx, result) -> str:
        best = result.best_step
        return f"saved {ctx.run_dir / saved_folder(ctx.cfg.method)}" + (
            f" (best eval loss {result.best_eval_loss:.4f} at step {best})" if best else ""
        )
