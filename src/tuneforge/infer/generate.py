"""Generation, written once for eval, chat, the server and PPO's rollouts.

``generate_tokens`` is ``model.generate`` for any method (prefix / prompt tuning through the path
that matches their training forward); ``sampling_kwargs``, ``left_padded`` and ``first_stop`` are
the pieces every caller shares. ``generate`` replies to many conversations in batches with a KV
cache, left padding, and a stop at end of turn.

Prompts that all begin with the same tokens (the system prompt, the few-shot examples) share
that prefix: its keys and values are computed once and copied into every batch, so only the
part that differs is run per example. Each row is laid out as ``[shared prefix][padding][own
suffix]``; the attention mask hides the padding and position ids follow the mask, so every token
sits at the position it has in the unpadded prompt (``share_prefix=False`` is the plain path that
tests compare against).
"""

from __future__ import annotations

import copy
import inspect
import sys
import warnings

import torch
from tqdm.auto import tqdm

from tuneforge.data.render import end_of_turn_ids, render_prompt
from tuneforge.methods import unwrap
from tuneforge.methods.peft_methods import generate_prompt_learning, is_prompt_learning

# Below this many shared tokens the copy costs more than it saves.
MIN_SHARED_PREFIX = 8


def generate_tokens(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs
) -> torch.Tensor:
    """``model.generate`` for any method: prefix / prompt tuning go through our own path
    (see ``peft_methods.generate_prompt_learning``)."""
    if is_prompt_learning(model):
        return generate_prompt_learning(model, input_ids, attention_mask, **kwargs)
    if getattr(model, "_adapters_disabled", False):  # inside disabled_adapters(): the base
        model = model.get_base_model()
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def sampling_kwargs(temperature: float, top_p: float = 1.0, top_k: int | None = None) -> dict:
    """``generate`` keywords: greedy decoding when ``temperature`` is 0, else sampling."""
    if temperature > 0:
        return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (B, longest row), rows right-aligned as generation needs."""
    T = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r) :] = torch.tensor(r)
            mask[i, T - len(r) :] = 1
    return ids, mask


def first_stop(tokens: list[int], stop: list[int]) -> int | None:
    """Index of the first stop token in ``tokens``, None when there is none."""
    return next((j for j, tok in enumerate(tokens) if tok in stop), None)


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Length of the longest token prefix every prompt starts with."""
    if not prompts:
        return 0
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return n


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    base = unwrap(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def _prefix_cache(model, prefix: list[int], device: torch.device):
    ids = torch.tensor([prefix], device=device)
    out = model(input_ids=ids, use_cache=True)
    return getattr(out, "past_key_values", None) or out.cache


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    share_prefix: bool = True,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Reply to each conversation (the last message is the user's); greedy when temperature is 0.

    Prompts are rendered by the same template code as training (``render_prompt``).

    Args:
        model: a causal LM (plain or with a peft adapter).
        tokenizer: its tokenizer, with a chat template.
        conversations: one list of messages per prompt.
        max_new_tokens: longest reply in tokens.
        temperature: 0 for greedy decoding, else sampling with ``top_p``.
        seed: seeds sampling (each batch draws its own seed from it).
        batch_size: prompts per forward pass.
        share_prefix: compute a prefix every prompt shares once (same outputs, less work).
        progress: show a progress bar (examples done, examples/s) on stderr.
        desc: the progress bar's label.

    Returns:
        The reply text for each conversation, in order, without the end-of-turn token.
    """
    model.eval()
    device = next(model.parameters()).device
    stop = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    # Virtual tokens (prefix / prompt tuning) sit before the prompt: no shared-prefix cache then.
    share_prefix = share_prefix and not is_prompt_learning(model)
    shared = common_prefix_length(prompts) if share_prefix else 0
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    # Leave at least one token of each prompt outside the prefix: generation starts from it.
    shared = min(shared, min((len(p) for p in prompts), default=1) - 1)
    prefix_cache = _prefix_cache(model, prompts[0][:shared], device) if shared > 0 else None
    cache_key = _cache_kwarg(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    outputs: list[str] = [""] * len(prompts)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bar = tqdm(
        total=len(prompts),
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        desc=desc,
        unit="ex",
    )
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        B = len(idx)
        own_ids, own_mask = left_padded([prompts[i][shared:] for i in idx], pad)
        prefix = torch.tensor(prompts[idx[0]][:shared], dtype=torch.long).expand(B, shared)
        ids = torch.cat([prefix, own_ids], 1)  # [shared prefix][padding][own suffix]
        mask = torch.cat([torch.ones_like(prefix), own_mask], 1)
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(B)
            kwargs[cache_key] = cache
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        kwargs.update(sampling_kwargs(temperature, top_p))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out = generate_tokens(model, ids.to(device), mask.to(device), **kwargs)
        T = ids.size(1)
        for row, i in enumerate(idx):
            new = out[row, T:].tolist()
            new = new[: first_stop(new, stop)]
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
        bar.update(B)
    bar.close()
    return outputs
