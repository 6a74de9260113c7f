"""Typed configuration: YAML + dotted ``key=value`` overrides, with errors that name the key.

Every field has a docstring-like ``help`` string; the same text is shown by ``--help`` and in the
README's config reference (``tuneforge config-reference`` prints it).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuneforge.errors import TuneforgeError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class MethodConfig:
    """How the model is adapted."""

    name: str = _f(
        "lora",
        "full | lora | qlora: which weights train (qlora: LoRA on a base held in 4 bits).",
        choices=("full", "lora", "qlora"),
    )
    r: int = _f(16, "LoRA rank (lora).")
    lora_alpha: float = _f(32.0, "LoRA scaling numerator; the update is scaled by lora_alpha / r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input path during training.")
    target_modules: list[str] | str = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "Module names (or suffixes) to adapt, or 'all-linear' for every linear layer but the head.",
    )
    quant_type: str = _f(
        "nf4",
        "qlora: 4-bit data type of the frozen base, nf4 (NormalFloat, for normally distributed "
        "weights) or fp4.",
        choices=("nf4", "fp4"),
    )
    double_quant: bool = _f(
        True,
        "qlora: quantize the per-block scales again (8-bit, blocks of 256), ~0.37 fewer bits "
        "per weight.",
    )
    compute_dtype: str = _f(
        "float32",
        "qlora: dtype the 4-bit weights are dequantized to for each matmul (bfloat16 on GPUs "
        "for speed; float32 on CPU).",
        choices=("float32", "bfloat16", "float16"),
    )


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes tokens."""

    train: str = _f("", "Training data: .jsonl, .json, .csv or .parquet.")
    eval: str | None = _f(None, "Held-out data for eval loss and early stopping (optional).")
    eval_split: float = _f(
        0.0, "If no eval file: fraction of train held out (deterministic by seed)."
    )
    format: str = _f(
        "auto", "auto | instruction | chat: record layout.", choices=("auto", "instruction", "chat")
    )
    max_length: int = _f(
        512, "Longest sample in tokens; longer ones are truncated (never to zero labels)."
    )
    system_prompt: str | None = _f(
        None, "System message added to records that have none (else the template's default)."
    )
    packing: bool = _f(
        False,
        "Pack several samples per row of max_length tokens (each attends only to itself); "
        "training.batch_size then counts rows.",
    )
    group_by_length: bool = _f(
        False, "Without packing: batch samples of similar length together (less padding)."
    )
    clean: bool = _f(
        False,
        "Normalise unicode and whitespace, strip control characters, drop records with empty "
        "outputs or that train would refuse (as `tuneforge data clean`); drops are reported.",
    )
    dedup: bool = _f(
        False, "Drop exact and near-duplicate training records (as `tuneforge data dedup`)."
    )
    dedup_threshold: float = _f(
        0.85,
        "Jaccard similarity of word 2-gram shingles from which two records are near duplicates "
        "(data.dedup and the eval contamination warning).",
    )
    mix: list[dict] = _f(
        [],
        "Other datasets mixed into train by share of the final set, e.g. "
        "[{path: general.jsonl, ratio: 0.2}]; data.train keeps every record (seeded sampling).",
    )
    augment: int = _f(
        0,
        "Grow the training set K-fold with augmented variants of each record (0: off); eval "
        "data is never augmented.",
    )
    augment_mode: str = _f(
        "both",
        "both | paraphrase | noise: rewrites of the instruction by the base model, and/or word "
        "dropout and swaps; expected outputs are never changed.",
        choices=("both", "paraphrase", "noise"),
    )
    augment_noise: float = _f(0.1, "Word dropout and swap probability of noise variants.")


@dataclass
class TrainingConfig:
    """The optimisation loop."""

    objective: str = _f("sft", "sft: supervised fine-tuning on assistant tokens.", choices=("sft",))
    learning_rate: float = _f(2.0e-4, "Peak learning rate (AdamW).")
    num_epochs: float = _f(3.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(0, "Optimizer steps to run; 0 means use num_epochs.")
    batch_size: int = _f(4, "Samples per micro-batch.")
    gradient_accumulation: int = _f(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = _f(0.0, "Fraction of steps with linear warmup from 0.")
    weight_decay: float = _f(0.0, "AdamW weight decay (never applied to biases and norm weights).")
    lr_scheduler: str = _f(
        "cosine",
        "cosine | linear | constant (after warmup).",
        choices=("cosine", "linear", "constant"),
    )
    optimizer: str = _f(
        "adamw",
        "adamw | adamw_8bit | paged_adamw | paged_adamw_8bit (8-bit and paged: bitsandbytes; "
        "paged needs a CUDA GPU and falls back to the unpaged one elsewhere, with a notice).",
        choices=("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"),
    )
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    seed: int = _f(42, "Seed for initialisation, data order and dropout.")
    eval_steps: int = _f(0, "Evaluate every N optimizer steps (0: once per epoch).")
    early_stopping_patience: int = _f(
        0, "Stop after N evaluations without improvement in eval loss (0: never stop early)."
    )
    save_steps: int = _f(0, "Write a checkpoint every N optimizer steps (0: at each evaluation).")
    save_total_limit: int = _f(2, "Checkpoints to keep (oldest removed first).")
    logging_steps: int = _f(1, "Append to metrics.jsonl every N optimizer steps.")
    max_bad_steps: int = _f(
        5,
        "A non-finite loss or gradient norm skips the step; stop after this many in a row.",
    )
    dtype: str = _f(
        "auto",
        "auto | float32 | bfloat16: weight/compute dtype (auto: float32 on CPU, bfloat16 on GPUs that support it).",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = _f("auto", "auto | cpu | cuda | cuda:N.")
    attn_implementation: str = _f(
        "auto",
        "auto | sdpa | eager | flash_attention_2 (auto: flash-attn's variable-length kernel on "
        "GPUs where it is installed, else SDPA with a block-diagonal mask for packed rows).",
        choices=("auto", "sdpa", "eager", "flash_attention_2"),
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute layer activations in backward (non-reentrant): less memory, ~30% slower."
    )
    compile: bool = _f(
        False, "torch.compile each decoder layer (first steps are slow while it compiles)."
    )
    progress: bool = _f(True, "Show a progress bar (loss, lr, tokens/s, ETA).")


@dataclass
class Config:
    """A tuneforge run."""

    model: str = _f(
        "", "alias (smollm2-135m-instruct, tiny-llama) | HF folder | file.gguf | hub id."
    )
    output_dir: str = _f("", "Run folder: config, adapter or model, checkpoints, metrics.")
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    trust_remote_code: bool = _f(False, "Allow model code from the model folder (off by default).")


SECTIONS = {"method": MethodConfig, "data": DataConfig, "training": TrainingConfig}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f" (valid: {', '.join(sorted(options))})"


def _where(source: str, lines: dict[str, int], key: str) -> str:
    line = lines.get(key)
    return f"{source}:{line}: " if line else (f"{source}: " if source else "")


def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check/convert ``value`` to the field's type; raise a one-line error naming ``key``."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and str in args:
            return value
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except TuneforgeError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise TuneforgeError(f"{where}'{key}' must be {names}, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise TuneforgeError(f"{where}'{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TuneforgeError(f"{where}'{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise TuneforgeError(f"{where}'{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TuneforgeError(f"{where}'{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise TuneforgeError(f"{where}'{key}' must be a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TuneforgeError(f"{where}'{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise TuneforgeError(f"{where}'{key}' must be a string, got {value!r}")
    return value


def _type_name(t: Any) -> str:
    if typing.get_origin(t) is list:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        t, str(t)
    )


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys ('training.learning_rate') to their 1-based line in the YAML text."""
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return lines


def _apply(cfg: Any, data: dict, prefix: str, source: str, lines: dict[str, int]) -> None:
    hints = typing.get_type_hints(type(cfg))
    fields = _fields(type(cfg))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            where = _where(source, lines, key)
            section = prefix.rstrip(".") or "the top level"
            raise TuneforgeError(
                f"{where}unknown key '{name}' in {section}{_suggest(str(name), list(fields))}"
            )
        where = _where(source, lines, key)
        if name in SECTIONS and prefix == "":
            if isinstance(value, str) and name == "method":
                value = {"name": value}
            if value is None:
                continue
            if not isinstance(value, dict):
                raise TuneforgeError(f"{where}'{key}' must be a mapping of keys to values")
            _apply(getattr(cfg, name), value, key + ".", source, lines)
            continue
        coerced = _coerce(value, hints[name], key, where)
        choices = fields[name].metadata.get("choices")
        if choices and coerced not in choices:
            raise TuneforgeError(
                f"{where}'{key}' is {coerced!r}; choose one of {', '.join(choices)}"
            )
        setattr(cfg, name, coerced)


def parse_overrides(overrides: list[str]) -> dict:
    """``['training.learning_rate=1e-4', 'method.r=8']`` -> nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise TuneforgeError(
                f"override '{item}' must look like key=value (e.g. training.learning_rate=1e-4)"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TuneforgeError(f"override '{item}' conflicts with an earlier one")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply dotted overrides, validate, and return a typed ``Config``.

    Raises:
        TuneforgeError: unreadable file, invalid YAML, unknown key, wrong type or bad value.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TuneforgeError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TuneforgeError(f"{path}: not a UTF-8 text file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise TuneforgeError(f"{path}{line}: invalid YAML ({problem})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise TuneforgeError(f"{path}:1: a config must be a mapping of keys to values")
        _apply(cfg, data, "", str(path), _key_lines(text))
    if overrides:
        _apply(cfg, parse_overrides(overrides), "", "override", {})
    validate(cfg, str(path) if path else "config")
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Range checks that types alone cannot express."""
    t, m, d = cfg.training, cfg.method, cfg.data

    def bad(key: str, msg: str) -> None:
        raise TuneforgeError(f"{source}: '{key}' {msg}")

    if not cfg.model:
        bad("model", "is required (e.g. model: smollm2-135m-instruct)")
    if not cfg.output_dir:
        bad("output_dir", "is required (e.g. output_dir: runs/my-run)")
    if not d.train:
        bad("data.train", "is required (a .jsonl, .json, .csv or .parquet file)")
    if t.learning_rate <= 0:
        bad("training.learning_rate", f"must be positive, got {t.learning_rate}")
    if t.num_epochs <= 0 and t.max_steps <= 0:
        bad("training.num_epochs", "must be positive (or set training.max_steps)")
    if t.max_steps < 0:
        bad("training.max_steps", f"must be >= 0, got {t.max_steps}")
    for key in (
        "batch_size",
        "gradient_accumulation",
        "save_total_limit",
        "logging_steps",
        "max_bad_steps",
    ):
        if getattr(t, key) < 1:
            bad(f"training.{key}", f"must be at least 1, got {getattr(t, key)}")
    for key in ("eval_steps", "save_steps", "early_stopping_patience"):
        if getattr(t, key) < 0:
            bad(f"training.{key}", f"must be >= 0, got {getattr(t, key)}")
    if not 0 <= t.warmup_ratio < 1:
        bad("training.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    if t.weight_decay < 0:
        bad("training.weight_decay", f"must be >= 0, got {t.weight_decay}")
    if t.max_grad_norm < 0:
        bad("training.max_grad_norm", f"must be >= 0, got {t.max_grad_norm}")
    if d.max_length < 8:
        bad("data.max_length", f"must be at least 8 tokens, got {d.max_length}")
    if not 0 <= d.eval_split < 1:
        bad("data.eval_split", f"must be in [0, 1), got {d.eval_split}")
    if not 0 < d.dedup_threshold <= 1:
        bad("data.dedup_threshold", f"must be in (0, 1], got {d.dedup_threshold}")
    if d.augment < 0 or d.augment == 1:
        bad("data.augment", f"must be 0 (off) or a factor of at least 2, got {d.augment}")
    if not 0 < d.augment_noise < 1:
        bad("data.augment_noise", f"must be in (0, 1), got {d.augment_noise}")
    if d.mix:
        from tuneforge.data.mix import parse_mix_config

        try:
            d.mix = parse_mix_config(d.mix)
        except TuneforgeError as e:
            raise TuneforgeError(f"{source}: {e}") from None
    if m.name == "qlora" or t.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        _require_bitsandbytes(m.name, t.optimizer, bad)
    if m.name in ("lora", "qlora"):
        if m.r < 1:
            bad("method.r", f"must be at least 1, got {m.r}")
        if m.lora_alpha <= 0:
            bad("method.lora_alpha", f"must be positive, got {m.lora_alpha}")
        if not 0 <= m.lora_dropout < 1:
            bad("method.lora_dropout", f"must be in [0, 1), got {m.lora_dropout}")
        if isinstance(m.target_modules, str) and m.target_modules != "all-linear":
            m.target_modules = [t.strip() for t in m.target_modules.split(",") if t.strip()]
        if isinstance(m.target_modules, list) and not m.target_modules:
            bad("method.target_modules", "must name at least one module (or 'all-linear')")


def _require_bitsandbytes(method: str, optimizer: str, bad) -> None:
    """qlora and the 8-bit optimizers need bitsandbytes; say so before anything is loaded."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        return
    install = "pip install 'tuneforge[qlora]' (bitsandbytes>=0.45)"
    if method == "qlora":
        bad(
            "method.name",
            f"qlora needs bitsandbytes, which is not installed: {install}, "
            "or use method.name: lora",
        )
    bad(
        "training.optimizer",
        f"{optimizer} needs bitsandbytes, which is not installed: "
        f"{install}, or use training.optimizer: adamw",
    )


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def config_reference() -> str:
    """Markdown reference of every key, its default and its help text."""

    def row(key: str, f: dataclasses.Field) -> str:
        text = f.metadata.get("help", "").replace("|", "\\|")
        return f"| `{key}` | `{_default(f)}` | {text} |"

    out = []
    top = [f for f in dataclasses.fields(Config) if f.name not in SECTIONS]
    out.append("| key | default | meaning |\n| --- | --- | --- |")
    for f in top:
        out.append(row(f.name, f))
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            out.append(row(f"{section}.{f.name}", f))
    return "\n".join(out)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return ""
