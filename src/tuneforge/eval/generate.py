"""Batched generation with a KV cache, left padding, and stop at end of turn."""

from __future__ import annotations

import torch

from tuneforge.data.render import end_of_turn_ids, render_prompt
from tuneforge.methods import generate_tokens


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """Reply to each conversation (the last message is the user's); greedy when temperature is 0.

    Prompts are rendered by the same template code as training (``render_prompt``).
    """
    model.eval()
    device = next(model.parameters()).device
    stop = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    outputs: list[str] = [""] * len(prompts)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, T - len(p) :] = torch.tensor(p)
            mask[row, T - len(p) :] = 1
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = generate_tokens(model, ids.to(device), mask.to(device), **kwargs)
        for row, i in enumerate(idx):
            new = out[row, T:].tolist()
            for j, tok in enumerate(new):
                if tok in stop:
                    new = new[:j]
                    break
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
    return outputs
