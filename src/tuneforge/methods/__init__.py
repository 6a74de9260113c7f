"""Method name -> how to apply it to a loaded model; the trainable-parameter report."""

from __future__ import annotations

import torch

from tuneforge.config import MethodConfig


def apply_method(model: torch.nn.Module, cfg: MethodConfig) -> torch.nn.Module:
    """Return the model prepared for training with ``cfg.name`` (frozen base + adapters, or all)."""
    if cfg.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.name == "lora":
        from tuneforge.methods.peft_methods import apply_lora

        return apply_lora(model, cfg)
    if cfg.name == "qlora":  # the base was loaded in 4 bits (methods/quantize.py)
        from tuneforge.methods.quantize import apply_qlora

        return apply_qlora(model, cfg)
    raise ValueError(f"unknown method {cfg.name}")  # config validation prevents this


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        # a 4-bit weight (bitsandbytes) packs two values per element; count the weights it holds
        total += (
            p.numel() if getattr(p, "quant_state", None) is None else p.quant_state.shape.numel()
        )
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def describe_trainable(model: torch.nn.Module) -> str:
    trainable, total = trainable_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"
