"""Prefix and prompt tuning on packed batches (several samples per row, ``collate_packed``).

peft's forward for these methods only knows 2D padding masks: it prepends ``num_virtual_tokens``
ones to the mask and, for prompt tuning, drops the position ids. A packed batch carries a 4D
block-diagonal causal mask (B, 1, T, T) and position ids that restart at 0 for every sample, so
we build the base model's inputs ourselves:

* **prefix**: the V prefix keys/values are a cache in front of the row. The mask gets V prefix
  columns that are True for every query, so every sample in the row sees the prefix, and the
  block-diagonal part still keeps samples apart. Positions are the packed ones + V: exactly what
  an unpacked sample gets (its positions start after the prefix's 0..V-1).
* **prompt**: every sample gets its own copy of the soft prompt. A row ``s1 s2 ...`` becomes
  ``P s1 P s2 ...``; each ``P s_k`` block is one causal block of the mask (it sees its own
  virtual tokens and itself only) and its positions run 0..V+n-1, as an unpacked sample's do.
  The outputs at the samples' tokens are gathered back into the packed layout (B, T, ...), so
  labels and the loss are those of the packed batch unchanged.

Samples are found from the position ids (each sample starts at position 0), which is also how
flash-attention's variable-length path splits a row; the padding after a row's last sample
starts at 0 too and becomes one more block (its labels are ignored).
"""

from __future__ import annotations

import inspect

import torch

from tuneforge.errors import TuneforgeError

FLASH_PREFIX = (
    "prefix tuning with data.packing needs training.attn_implementation: sdpa (its prefix is a "
    "cache that flash-attention's packed path cannot mask), or set data.packing: false"
)


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    """True for a batch from ``collate_packed``: position ids and a 4D (or, flash, no) mask."""
    mask = batch.get("attention_mask")
    return "position_ids" in batch and (mask is None or mask.dim() == 4)


def packed_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], hidden_only: bool = False
) -> torch.Tensor:
    """Logits (B, T, vocab), or with ``hidden_only`` the decoder's last hidden states (B, T, C),
    of a prefix / prompt-tuned ``PeftModel`` on a packed batch, in the batch's own layout.

    Args:
        model: a ``PeftModel`` whose active adapter is prefix or prompt tuning.
        batch: ``input_ids``, ``position_ids`` and a boolean ``attention_mask`` (B, 1, T, T)
            (absent with flash-attention); ``labels`` is ignored.
    """
    from peft import PeftType

    base = model.get_base_model()
    net = base.get_decoder() if hidden_only else base
    if model.active_peft_config.peft_type == PeftType.PREFIX_TUNING:
        kwargs, index = _prefix_inputs(model, net, batch), None
    else:
        kwargs, index = _prompt_inputs(model, batch)
    out = net(**kwargs, use_cache=False)
    x = out.last_hidden_state if hidden_only else out.logits
    if index is None:
        return x
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def _prefix_inputs(model, net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    mask = batch.get("attention_mask")
    if mask is None:
        raise TuneforgeError(FLASH_PREFIX)
    V = model.active_peft_config.num_virtual_tokens
    input_ids = batch["input_ids"]
    B, T = input_ids.shape
    prefix_columns = torch.ones(B, 1, T, V, dtype=torch.bool, device=mask.device)
    # transformers renamed ``past_key_values`` to ``cache`` during 5.x.
    params = inspect.signature(net.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return {
        "input_ids": input_ids,
        "attention_mask": torch.cat([prefix_columns, mask.bool()], dim=-1),  # (B, 1, T, V + T)
        "position_ids": batch["position_ids"] + V,
        cache_arg: model.get_prompt(batch_size=B, max_cache_len=T + V),
    }


def _prompt_inputs(model, batch: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
    V = model.active_peft_config.num_virtual_tokens
    input_ids, positions = batch["input_ids"], batch["position_ids"]
    B, T = input_ids.shape
    device = input_ids.device
    starts = positions == 0  # (B, T): the first token of every sample
    segment = starts.long().cumsum(1) - 1  # (B, T): which sample of its row a token belongs to
    index = torch.arange(T, device=device) + V * (segment + 1)  # each token's place, prompts in
    length = T + V * starts.sum(1)  # (B,) expanded row lengths
    T2 = int(length.max())

    # The V slots in front of every sample.
    b_s, t_s = starts.nonzero(as_tuple=True)  # (N,) one entry per sample
    j = torch.arange(V, device=device)
    slots = (t_s + V * segment[b_s, t_s])[:, None] + j  # (N, V)
    slot_rows = b_s[:, None].expand(-1, V)

    embeds = model.word_embeddings(input_ids)  # (B, T, C)
    prompt = model.get_prompt(batch_size=1)[0].to(embeds.dtype)  # (V, C)
    rows = torch.arange(B, device=device)[:, None].expand(-1, T)
    flat_rows = torch.cat([rows.reshape(-1), slot_rows.reshape(-1)])
    flat_cols = torch.cat([index.reshape(-1), slots.reshape(-1)])
    values = torch.cat([embeds.reshape(B * T, -1), prompt.repeat(len(b_s), 1)])
    expanded = embeds.new_zeros(B, T2, embeds.shape[-1]).index_put((flat_rows, flat_cols), values)

    # Positions: 0..V-1 for the prompt, V.. for the sample; the tail after a shorter row counts
    # from 0 as its own block (like collate_packed's padding).
    tail = torch.arange(T2, device=device)[None] - length[:, None]
    new_positions = tail.clamp(min=0)
    new_positions = new_positions.index_put(
        (flat_rows, flat_cols),
        torch.cat([(positions + V).reshape(-1), j.repeat(len(b_s))]),
    )
    kwargs = {"inputs_embeds": expanded, "position_ids": new_positions}
    if batch.get("attention_mask") is not None:
        new_segment = torch.full((B, T2), -1, dtype=torch.long, device=device)
        new_segment = new_segment.index_put(
            (flat_rows, flat_cols),
            torch.cat([segment.reshape(-1), segment[b_s, t_s].repeat_interleave(V)]),
        )
        same = new_segment[:, :, None] == new_segment[:, None, :]
        causal = torch.ones(T2, T2, dtype=torch.bool, device=device).tril()
        real = (new_segment >= 0)[:, :, None]
        mask = same & causal & real
        mask |= torch.eye(T2, dtype=torch.bool, device=device)[None] & ~real  # no empty row
        kwargs["attention_mask"] = mask[:, None]  # (B, 1, T2, T2)
    return kwargs, index


def packed_row_cost(model: torch.nn.Module, flash_varlen: bool = False) -> int:
    """Tokens a packed row holds per sample beyond the sample's own (prompt tuning: its soft
    prompt), so ``pack_rows`` keeps expanded rows within ``max_length``.

    Raises:
        TuneforgeError: prefix tuning with flash-attention's packed path, which cannot mask the
            prefix (checked before training starts).
    """
    from tuneforge.methods.peft_methods import is_prompt_learning, virtual_token_count

    if flash_varlen and is_prompt_learning(model) and not virtual_token_count(model):
        raise TuneforgeError(FLASH_PREFIX)
    return virtual_token_count(model)
