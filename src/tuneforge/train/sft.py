"""Supervised fine-tuning: next-token cross-entropy on assistant tokens only."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from tuneforge.data.batching import supervised_tokens
from tuneforge.losses import causal_lm_loss_sum, selective_lm_loss_sum
from tuneforge.methods.peft_methods import is_prompt_learning, virtual_token_count
from tuneforge.methods.quantize_embed import QuantizedHead, head_weight
from tuneforge.methods.virtual_packing import is_packed, packed_forward


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
            # sharded by FSDP2: the root's forward gathers the embeddings and the tied head,
            # which calling the decoder directly would skip
            and not isinstance(getattr(head, "weight", None), DTensor)
            and head.bias is None
            and not getattr(cfg, "final_logit_softcapping", None)
            and getattr(cfg, "logit_scale", None) in (None, 1.0)
            and hasattr(base, "get_decoder")
        )

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        base = _unwrap(model)
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
