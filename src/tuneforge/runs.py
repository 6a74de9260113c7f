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


def load_for_inference(ref: str, dtype: str = "auto", device: str = "auto", adapter: bool = True):
    """(model, tokenizer) for a run folder (base + adapter, or the full model) or a model reference.

    Args:
        ref: run folder, model folder, .gguf file, alias or hub id.
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
