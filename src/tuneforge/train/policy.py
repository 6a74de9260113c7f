"""Log-probs of labelled tokens under a causal LM (the policy), shared by DPO and PPO.

The fast path runs the decoder once and applies the LM head only where a label is supervised
(response tokens), so no (B, T, V) logits tensor is built; ``plain=True`` is the reference path
(full logits), which a test holds equal to the fast one.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.tensor import DTensor

from tuneforge.losses import IGNORE, token_logprobs
from tuneforge.methods import unwrap


def frozen_copy(lm: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``lm`` that never trains: the reference of full fine-tuning (PPO, KTO, GRPO)."""
    ref = copy.deepcopy(lm)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def head_is_sharded(base: torch.nn.Module) -> bool:
    """The LM head is sharded by FSDP2: only the root's forward gathers it and the embeddings,
    which calling the decoder directly would skip."""
    return isinstance(getattr(base.get_output_embeddings(), "weight", None), DTensor)


def can_select(model: torch.nn.Module) -> bool:
    """Whether decoder + head on selected positions reproduces the model's own logits."""
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and getattr(peft_cfg, "is_prompt_learning", False):
        return False  # virtual tokens are added by the peft wrapper's forward
    base = unwrap(model)
    cfg = base.config
    return (
        hasattr(base, "get_decoder")
        and not head_is_sharded(base)
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", None) in (None, 1.0)
    )


def decoder_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (B, T, C), after the last norm."""
    inputs = {
        k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")
    }
    return unwrap(model).get_decoder()(**inputs, use_cache=False).last_hidden_state


def labelled_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    plain: bool = False,
) -> torch.Tensor:
    """Per-token log-probs of the labelled tokens, shifted as the loss uses them.

    Args:
        batch: input_ids, attention_mask, labels (B, T).
        temperature: logits are divided by it (PPO samples at a temperature).
        plain: use the full-logits reference path.

    Returns:
        (B, T-1) log p(labels[:, t+1] | tokens <= t), zero where the label is IGNORE.
    """
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    if plain or not can_select(model):
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        logits = model(**inputs, use_cache=False).logits  # (B, T [+ virtual], V)
        logits = logits[:, -batch["input_ids"].size(1) :][:, :-1]
        logp = token_logprobs(logits / temperature, targets.clamp(min=0))
        return logp * keep
    hidden = decoder_hidden(model, batch)[:, :-1][keep]  # (N, C)
    logits = unwrap(model).get_output_embeddings()(hidden)  # (N, V)
    return out.masked_scatter(keep, token_logprobs(logits / temperature, targets[keep]))


def response_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """(B,) labelled target positions per row."""
    return (labels[:, 1:] != IGNORE).sum(-1)
