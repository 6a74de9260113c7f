"""Method name -> how to apply it to a loaded model; adapters on a model; the parameter report.

| method  | what trains                                          | code                 |
| ------- | ---------------------------------------------------- | -------------------- |
| full    | every weight                                         | here                 |
| lora    | low-rank A, B beside target linears (``use_rslora``) | peft                 |
| dora    | LoRA + a magnitude vector per output (Liu 2024)      | peft                 |
| ia3     | vectors rescaling k, v and feed-forward activations  | peft                 |
| adapter | bottleneck MLPs after attention / MLP blocks         | ours (bottleneck.py) |
| prefix  | key/value prefixes in every layer                    | peft (+ generate, packed rows: virtual_packing.py)|
| prompt  | soft-prompt embeddings before the input              | peft (+ generate, packed rows: virtual_packing.py)|
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from tuneforge.config import MethodConfig
from tuneforge.errors import TuneforgeError

PEFT_METHODS = ("lora", "dora", "ia3", "prefix", "prompt")
MERGEABLE = ("LORA", "IA3")  # peft_type values whose update folds into the weights


def trains_adapter(method: MethodConfig | str) -> bool:
    """Whether ``method`` trains an adapter beside a frozen base (saved as ``adapter/``; the
    reference model of DPO / PPO is the base with the adapter off) rather than every weight
    (``full``: saved as ``model/``; the reference is a frozen copy of the start)."""
    return (method if isinstance(method, str) else method.name) != "full"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under an adapter wrapper (peft's, or the bottleneck adapter's);
    the injected adapter layers stay in it. ``model`` itself when it has no wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def saved_folder(method: MethodConfig | str) -> str:
    """The run folder's subfolder that holds what ``method`` trained."""
    return "adapter" if trains_adapter(method) else "model"


def load_base(cfg, device: torch.device):
    """``(model, tokenizer, resolved)``: the base model as ``cfg.method`` trains it, for every
    objective: in 4 bits (bitsandbytes) for qlora, in float32 for full fine-tuning with master
    weights (train/precision.py), else in ``training.dtype``.

    Raises:
        TuneforgeError: the model reference cannot be loaded, or 4-bit weights cannot run here.
    """
    from tuneforge.models import load_model
    from tuneforge.train.precision import Precision

    t = cfg.training
    args = (cfg.model, t.dtype, str(device), cfg.trust_remote_code, t.attn_implementation)
    if cfg.method.name == "qlora":
        from tuneforge.methods.quantize import load_quantized_model

        return load_quantized_model(*args, method=cfg.method)
    dtype = Precision.of(t, device).load_dtype(trains_base=not trains_adapter(cfg.method))
    return load_model(*args, load_dtype=dtype)


def apply_method(model: torch.nn.Module, cfg: MethodConfig, tokenizer=None) -> torch.nn.Module:
    """Return the model prepared for training with ``cfg.name`` (frozen base + adapters, or all).

    Args:
        tokenizer: used by ``prompt`` to initialise the soft prompt from ``prompt_init_text``.
    """
    if not trains_adapter(cfg):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.name in PEFT_METHODS:
        from tuneforge.methods.peft_methods import apply_peft_method

        return apply_peft_method(model, cfg, tokenizer)
    if cfg.name == "adapter":
        from tuneforge.methods.bottleneck import apply_bottleneck

        return apply_bottleneck(model, cfg)
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


# -- saved adapters -------------------------------------------------------------------------------
def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise TuneforgeError(f"{path}: not found (is '{adapter_dir}' an adapter folder?)") from None
    except json.JSONDecodeError:
        raise TuneforgeError(f"{path}: not valid JSON") from None


def adapter_kind(adapter_dir: str | Path) -> str:
    """The tuneforge method name of a saved adapter (lora, dora, ia3, adapter, prefix, prompt)."""
    config = read_adapter_config(adapter_dir)
    kind = config.get("peft_type")
    if kind == "LORA":
        return "dora" if config.get("use_dora") else "lora"
    names = {
        "IA3": "ia3",
        "BOTTLENECK": "adapter",
        "PREFIX_TUNING": "prefix",
        "PROMPT_TUNING": "prompt",
    }
    if kind not in names:
        raise TuneforgeError(
            f"{Path(adapter_dir) / 'adapter_config.json'}: adapter type {kind!r} is not one "
            "tuneforge loads (lora, dora, ia3, adapter, prefix, prompt)"
        )
    return names[kind]


def load_adapter(
    model: torch.nn.Module,
    adapter_dir: str | Path,
    name: str = "default",
    is_trainable: bool = False,
) -> torch.nn.Module:
    """Load a saved adapter (any method) onto ``model`` under ``name``; returns the wrapped model.

    ``model`` may already hold adapters; a new one must be of the same family (LoRA with DoRA,
    otherwise one type: IA3, prefix, prompt or bottleneck adapters).
    """
    kind = adapter_kind(adapter_dir)
    held = loaded_adapter_kinds(model)
    if held and _family(kind) != _family(held[0]):
        raise TuneforgeError(
            f"'{adapter_dir}' is a {kind} adapter; it cannot join the {held[0]} adapter already "
            "on this model (load adapters of one family together)"
        )
    if name in adapter_names(model):
        raise TuneforgeError(f"two adapters are named '{name}'; give each a distinct name")
    if kind == "adapter":
        from tuneforge.methods.bottleneck import load_bottleneck

        return load_bottleneck(model, adapter_dir, name)
    from tuneforge.methods.peft_methods import load_peft_adapter

    return load_peft_adapter(model, str(adapter_dir), name, is_trainable)


def _family(kind: str) -> str:
    return {"dora": "lora"}.get(kind, kind)


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapters loaded on ``model`` (empty for a plain model)."""
    configs = getattr(model, "peft_config", None) or getattr(model, "adapter_configs", None)
    return list(configs or {})


def loaded_adapter_kinds(model: torch.nn.Module) -> list[str]:
    if hasattr(model, "adapter_configs"):
        return ["adapter"] * len(model.adapter_configs)
    out = []
    for c in (getattr(model, "peft_config", None) or {}).values():
        kind = str(getattr(c.peft_type, "value", c.peft_type))
        out.append(
            {"LORA": "dora" if getattr(c, "use_dora", False) else "lora", "IA3": "ia3"}.get(
                kind, "prefix" if kind == "PREFIX_TUNING" else "prompt"
            )
        )
    return out


def load_adapters(model: torch.nn.Module, adapters: dict[str, str | Path]) -> torch.nn.Module:
    """Load several named adapters onto one base model; the first becomes active."""
    for name, path in adapters.items():
        model = load_adapter(model, path, name)
    if adapters:
        set_active_adapter(model, next(iter(adapters)))
    return model


def set_active_adapter(model: torch.nn.Module, name: str) -> None:
    """Make adapter ``name`` the one the model runs with."""
    names = adapter_names(model)
    if name not in names:
        raise TuneforgeError(
            f"no adapter named '{name}' is loaded; loaded: {', '.join(names) or 'none'}"
        )
    model.set_adapter(name)


@contextlib.contextmanager
def disabled_adapters(model: torch.nn.Module):
    """The base model inside the block (every adapter off); a plain model is left as is.

    This is also the reference model for objectives that need one (DPO, PPO).
    """
    if not adapter_names(model):
        yield model
        return
    with model.disable_adapter():
        yield model


def check_mergeable(adapter_dir: str | Path) -> None:
    """Raise a one-line error for adapters whose update is not a weight delta."""
    kind = adapter_kind(adapter_dir)
    if read_adapter_config(adapter_dir).get("peft_type") not in MERGEABLE:
        raise TuneforgeError(
            f"a {kind} adapter cannot be merged into the weights (only lora, dora and ia3 "
            "change existing weights); use the run folder itself with generate / eval"
        )
