"""A run folder (or a plain model reference) -> a model ready for inference."""

from __future__ import annotations

import re
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
    # Runs from before method.quantize_embeddings trained with full-precision embeddings.
    method = {"quantize_embeddings": False, **method}
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


def load_for_inference(
    ref: str,
    dtype: str = "auto",
    device: str = "auto",
    adapter: bool = True,
    adapters: dict[str, str] | None = None,
    active: str | None = None,
):
    """(model, tokenizer) for a run folder (base + adapter, or the full model) or a model reference.

    Args:
        ref: run folder, model folder, .gguf file, alias or hub id. A qlora run loads its base
            in 4 bits, quantized as in training, with the adapter on top.
        adapter: load the run's adapter on top of its base (False: the base model alone).
        adapters: more adapters to load onto the same base, name -> run folder (or adapter
            folder). The run's own adapter is named after its folder.
        active: the adapter to run with (default: the run's own, else the first of ``adapters``).

    Raises:
        TuneforgeError: not a run / model, an adapter trained on another base, an unknown name.
    """
    from tuneforge.data.render import ensure_chat_template
    from tuneforge.methods import load_adapters, set_active_adapter
    from tuneforge.models import load_model, load_tokenizer

    path = Path(ref)
    named: dict[str, str] = {}
    if path.is_dir() and (path / "config.yaml").is_file() and not is_run(path):
        raise TuneforgeError(
            f"'{ref}' is a run folder without a trained adapter or model (did training finish?)"
        )
    if is_run(path):
        if (path / "model" / "config.json").is_file():
            base_ref = str(path / "model") if adapter else run_base_model(path)
            model, tokenizer, _ = load_model(base_ref, dtype, device)
        elif (method := quantized_run_method(path)) is not None:  # qlora: the 4-bit base
            base_ref = run_base_model(path)
            model, _, _ = load_quantized_run_base(path, method, dtype, device)
            tokenizer = load_tokenizer(str(path / "adapter"))
            if adapter:
                named[adapter_name(path)] = str(path / "adapter")
        else:
            base_ref = run_base_model(path)
            model, tokenizer, _ = load_model(base_ref, dtype, device)
            tokenizer = load_tokenizer(str(path / "adapter"))
            if adapter:
                named[adapter_name(path)] = str(path / "adapter")
    else:
        base_ref = ref
        model, tokenizer, _ = load_model(ref, dtype, device)
    for name, other in (adapters or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise TuneforgeError(f"adapter name '{name}': use letters, digits, '-' and '_' only")
        if name in named:
            raise TuneforgeError(f"two adapters are named '{name}'; name the other one NAME=RUN")
        named[name] = _adapter_dir(other, base_ref)
    model = load_adapters(model, named)
    if active is not None:
        set_active_adapter(model, active)
    ensure_chat_template(tokenizer)
    model.eval()
    return model, tokenizer


def adapter_name(run: str | Path) -> str:
    """The name a run's adapter gets on a model: its folder name (characters other than letters,
    digits, ``-`` and ``_`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(run).resolve().name) or "default"


def _adapter_dir(ref: str, base_ref: str) -> str:
    """The adapter folder of a run (checked to share ``base_ref``) or an adapter folder."""
    path = Path(ref)
    if (path / "adapter_config.json").is_file():
        return str(path)
    if not is_run(path) or not (path / "adapter" / "adapter_config.json").is_file():
        raise TuneforgeError(f"'{ref}' is not a run folder with an adapter/ (or an adapter folder)")
    other_base = run_base_model(path)
    if other_base != base_ref and not _same_model(other_base, base_ref):
        raise TuneforgeError(
            f"'{ref}' was trained on '{other_base}', not on '{base_ref}'; adapters only load "
            "onto the base they were trained from"
        )
    return str(path / "adapter")


def _same_model(a: str, b: str) -> bool:
    """Two references to one model (an alias and its cached folder, two spellings of a path)."""
    from tuneforge.models import resolve_model

    try:
        return Path(resolve_model(a)).resolve() == Path(resolve_model(b)).resolve()
    except TuneforgeError:
        return False


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
