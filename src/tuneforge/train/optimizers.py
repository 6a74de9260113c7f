"""``training.optimizer``: torch AdamW, or bitsandbytes' 8-bit and paged AdamW.

8-bit AdamW keeps both moment estimates in 8 bits (blockwise quantized, Dettmers et al. 2022) for
parameters of at least 4096 values; smaller ones keep 32-bit states. Paged optimizers put their
state in CUDA unified memory, so it is paged to CPU RAM when the GPU runs short (QLoRA, Dettmers
et al. 2023); that needs a CUDA GPU, and elsewhere the unpaged optimizer is used, with a notice.
bitsandbytes 0.50.2 runs 8-bit AdamW on CPU (checked on this project's CPU machine: its update is
within a few percent of torch's AdamW and its state saves and restores exactly).
"""

from __future__ import annotations

import os
import sys

import torch

from tuneforge.config import TrainingConfig


def effective_optimizer(name: str, device: torch.device) -> tuple[str, str | None]:
    """``(optimizer to use, notice or None)``: a paged optimizer without CUDA -> the unpaged one."""
    if not name.startswith("paged_"):
        return name, None
    plain = name.removeprefix("paged_")
    if device.type != "cuda":
        why = f"paged optimizers need a CUDA GPU (this run is on {device.type})"
    else:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is not None:
            return name, None
        why = "paged optimizers need bitsandbytes, which is not installed"
    return plain, f"notice: training.optimizer {name}: {why}; using {plain}"


def make_optimizer(groups: list[dict], t: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer ``t.optimizer`` names over parameter ``groups`` (each with its weight_decay)."""
    device = groups[0]["params"][0].device if groups else torch.device("cpu")
    name, notice = effective_optimizer(t.optimizer, device)
    if notice and int(os.environ.get("RANK", "0")) == 0:
        print(notice, file=sys.stderr, flush=True)
    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if name == "adamw" or not groups:
        return torch.optim.AdamW(groups, **kwargs)
    from tuneforge.methods.quantize import import_bitsandbytes

    optim = import_bitsandbytes(f"training.optimizer {name}", "training.optimizer: adamw").optim
    cls = {
        "adamw_8bit": optim.AdamW8bit,
        "paged_adamw": optim.PagedAdamW,
        "paged_adamw_8bit": optim.PagedAdamW8bit,
    }[name]
    return cls(groups, **kwargs)
