"""A run folder (or a plain model reference) -> a model ready for inference."""

from __future__ import annotations

from pathlib import Path

import yaml

from tuneforge.errors import TuneforgeError


def is_run(path: str | Path) -> bool:
    p = Path(path)
    return (
        p.is_dir()
        and (p / "config.yaml").is_file()
        and (
            (p / "adapter" / "adapter_config.json").is_file()
            or (p / "model" / "config.json").is_file()
        )
    )


def run_base_model(run: Path) -> str:
    """The model reference a run was trained from (as written in its config.yaml)."""
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        return cfg["model"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise TuneforgeError(f"{run / 'config.yaml'}: not a tuneforge run config") from None


def quantized_run_method(run: Path):
    """The run's ``MethodConfig`` if it trained on a 4-bit base (method qlora), else None."""
    import dataclasses

    from tuneforge.config import MethodConfig

    try:
        method = yaml.safe_load((run / "config.yaml").read_text()).get("method") or {}
    except (yaml.YAMLError, AttributeError):
        raise TuneforgeError(f"{run / 'config.yaml'}: not a tuneforge run config") from None
    if not isinstance(method, dict) or method.get("name") != "qlora":
        return None
    names = {f.name for f in dataclasses.fields(MethodConfig)}
    return MethodConfig(**{k: v for k, v in method.items() if k in names})


def run_base_dtype(run: Path, dtype: str = "auto") -> str:
    """``dtype``, or for "auto" the dtype the run's base was loaded in (its summary.json).

    A 4-bit base must be quantized from the same weights as in training to get the same codes.
    """
    summary = run / "summary.json"
    if dtype != "auto" or not summary.is_file():
        return dtype
    import json

    return json.loads(summary.read_text()).get("base_dtype", dtype)


def load_quantized_run_base(run: Path, method, dtype: str = "auto", device: str = "auto"):
    """``(model, tokenizer, resolved)``: a qlora run's base in 4 bits, as it was trained."""
    from tuneforge.methods.quantize import load_quantized_model

    return load_quantized_model(
        run_base_model(run), run_base_dtype(run, dtype), device, method=method
    )


def load_for_inference(ref: str, dtype: str = "auto", device: str = "auto", adapter: bool = True):
    """(model, tokenizer) for a run folder (base + adapter, or the full model) or a model reference.

    Args:
        ref: run folder, model folder, .gguf file, alias or hub id. A qlora run loads its base
            in 4 bits, quantized as in training, with the adapter on top.
        adapter: load the run's adapter on top of its base (False: the base model alone).
    """
    from tuneforge.data.render import ensure_chat_template
    from tuneforge.methods.peft_methods import load_adapter
    from tuneforge.models import load_model, load_tokenizer

    path = Path(ref)
    if path.is_dir() and (path / "config.yaml").is_file() and not is_run(path):
        raise TuneforgeError(
            f"'{ref}' is a run folder without a trained adapter or model (did training finish?)"
        )
    if is_run(path):
        if (path / "model" / "config.json").is_file():
            model, tokenizer, _ = load_model(
                str(path / "model") if adapter else run_base_model(path), dtype, device
            )
        elif (method := quantized_run_method(path)) is not None:  # qlora: the 4-bit base
            model, _, _ = load_quantized_run_base(path, method, dtype, device)
            tokenizer = load_tokenizer(str(path / "adapter"))
            if adapter:
                model = load_adapter(model, str(path / "adapter"))
        else:
            model, tokenizer, _ = load_model(run_base_model(path), dtype, device)
            tokenizer = load_tokenizer(str(path / "adapter"))
            if adapter:
                model = load_adapter(model, str(path / "adapter"))
    else:
        model, tokenizer, _ = load_model(ref, dtype, device)
    ensure_chat_template(tokenizer)
    model.eval()
    return model, tokenizer
