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


def parse_adapter_specs(items: list[str] | None) -> dict[str, str]:
    """``['a=runs/x', 'b=runs/y']`` -> ``{'a': 'runs/x', 'b': 'runs/y'}``.

    Raises:
        TuneforgeError: an item without ``=``, an empty or repeated name.
    """
    specs: dict[str, str] = {}
    for item in items or []:
        name, sep, run = item.partition("=")
        name, run = name.strip(), run.strip()
        if not sep or not name or not run:
            raise TuneforgeError(f"--adapters '{item}' must look like NAME=RUN_FOLDER")
        if name in specs:
            raise TuneforgeError(f"--adapters: the name '{name}' is given twice")
        specs[name] = run
    return specs


def _same_model(a: str, b: str) -> bool:
    from tuneforge.models import resolve_model

    return a == b or resolve_model(a) == resolve_model(b)


def load_with_adapters(ref: str, adapters: dict[str, str] | None = None, device: str = "auto"):
    """One base model with several named LoRA-family adapters, for chat and serve.

    Args:
        ref: a run folder (its adapter is loaded too, named after the folder) or a model
            reference (then only ``adapters`` are loaded).
        adapters: adapter name -> run folder; every run must have been trained on the same base.

    Returns:
        (model, tokenizer, base_name, adapter_names, default): ``model`` is a ``PeftModel`` when
        any adapter is loaded; ``default`` is the adapter to use when none is asked for (the run's
        own adapter, else None = the base model).

    Raises:
        TuneforgeError: a run without an adapter, an adapter trained on another base, a name
            clash.
    """
    from tuneforge.data.render import ensure_chat_template
    from tuneforge.models import load_model, load_tokenizer

    adapters = dict(adapters or {})
    path = Path(ref)
    own: tuple[str, Path] | None = None
    if is_run(path) and (path / "adapter" / "adapter_config.json").is_file():
        base_ref = run_base_model(path)
        own = (path.resolve().name, path / "adapter")
        if own[0] in adapters:
            raise TuneforgeError(
                f"--adapters: the name '{own[0]}' is already the served run's own adapter; "
                "pick another name"
            )
    elif is_run(path):
        base_ref = str(path / "model")  # a full fine-tune is itself the base
    else:
        if path.is_dir() and (path / "config.yaml").is_file():
            raise TuneforgeError(
                f"'{ref}' is a run folder without a trained adapter or model (did training finish?)"
            )
        base_ref = ref
    dirs: list[tuple[str, Path]] = [own] if own else []
    for name, run in adapters.items():
        run_path = Path(run)
        if not (run_path / "adapter" / "adapter_config.json").is_file():
            what = "a full fine-tune" if is_run(run_path) else "not a run folder with an adapter/"
            raise TuneforgeError(f"--adapters {name}={run}: {what}; it cannot be an adapter")
        if not _same_model(run_base_model(run_path), base_ref):
            raise TuneforgeError(
                f"--adapters {name}={run}: trained on '{run_base_model(run_path)}', "
                f"not on '{base_ref}'; adapters must share the served base model"
            )
        dirs.append((name, run_path / "adapter"))
    model, tokenizer, _ = load_model(base_ref, "auto", device)
    if own:
        tokenizer = load_tokenizer(str(own[1]))
    if dirs:
        from peft import PeftModel

        first, first_dir = dirs[0]
        model = PeftModel.from_pretrained(model, str(first_dir), adapter_name=first)
        for name, adapter_dir in dirs[1:]:
            model.load_adapter(str(adapter_dir), adapter_name=name)
        model.set_adapter(first)
    ensure_chat_template(tokenizer)
    model.eval()
    base_name = Path(base_ref).name if Path(base_ref).is_dir() else base_ref
    if is_run(path) and not own:
        base_name = path.resolve().name
    if base_name in adapters:
        raise TuneforgeError(f"--adapters: '{base_name}' names the base model; pick another name")
    return model, tokenizer, base_name, [n for n, _ in dirs], (own[0] if own else None)
