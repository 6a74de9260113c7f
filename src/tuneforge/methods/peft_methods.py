"""LoRA (and later the other peft families) through the ``peft`` library."""

from __future__ import annotations

import torch

from tuneforge.config import MethodConfig
from tuneforge.errors import TuneforgeError


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers a method can target (the LM head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(cfg: MethodConfig):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
    )


def apply_lora(model: torch.nn.Module, cfg: MethodConfig) -> torch.nn.Module:
    """Inject LoRA layers (peft wraps each target as ``base_layer`` + A/B)."""
    from peft import get_peft_model

    available = linear_module_names(model)
    if isinstance(cfg.target_modules, list):
        missing = [t for t in cfg.target_modules if t not in available]
        if len(missing) == len(cfg.target_modules):
            raise TuneforgeError(
                f"'method.target_modules' {cfg.target_modules} matches no layer of this model; "
                f"its linear layers are: {', '.join(available)} (or use 'all-linear')"
            )
    try:
        return get_peft_model(model, lora_config(cfg))
    except ValueError as e:
        raise TuneforgeError(f"'method.target_modules': {str(e).splitlines()[0]}") from None


def load_adapter(model: torch.nn.Module, adapter_dir: str, is_trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
