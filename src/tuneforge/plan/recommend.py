"""Estimates as tables, and the classic method choice driven by them (``tuneforge recommend``).

The choice table, as practitioners give it: limited memory -> QLoRA; several tasks -> one LoRA
adapter per task on a shared base; maximum quality -> full fine-tuning if it fits; quick
iteration -> LoRA with a small rank. Each rule is checked against the estimate for the user's
model and memory, and the reason printed names the numbers it used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuneforge.errors import TuneforgeError
from tuneforge.plan.estimate import (
    FIT_MARGIN,
    GIB,
    Estimate,
    MethodSettings,
    ModelShape,
    Workload,
    estimate_method,
    matmul_flops_per_second,
    model_shape,
)

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
GOALS = ("quality", "speed")


def parse_memory(text: str) -> float:
    """'24GB', '24GiB', '24G', '512MB' -> bytes. GB and GiB both mean 2**30 (a '24GB' GPU holds
    24 GiB).

    Raises:
        TuneforgeError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise TuneforgeError(f"--memory '{text}' is not a size; write e.g. 24GB, 16GiB or 512MB")
    return float(m.group(1)) * _UNITS[m.group(2)]


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_table(
    estimates: list[Estimate], memory: float | None, configured: str | None = None
) -> str:
    """A Markdown table, one row per method; sizes in GiB."""
    head = "| method | trainable | weights | grads | AdamW | activations | logits | peak GiB |"
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- |"
    if memory is not None:
        head += f" fits {gib(memory)} (+{FIT_MARGIN:.0%}) |"
        rule += " --- |"
    head += " time/step | time/epoch | note |"
    rule += " --- | --- | --- |"
    lines = [head, rule]
    for e in estimates:
        name = f"**{e.label}** (configured)" if e.method == configured else e.label
        row = (
            f"| {name} | {human_count(e.trainable)} | {gib(e.weights)} | {gib(e.gradients)} | "
            f"{gib(e.optimizer)} | {gib(e.activations)} | {gib(e.logits)} | {gib(e.peak)} |"
        )
        if memory is not None:
            row += " yes |" if e.fits(memory) else " no |"
        step = (
            f"{e.seconds_per_step:.2f} s"
            if e.seconds_per_step < 10
            else f"{e.seconds_per_step:.0f} s"
        )
        row += f" {step} | {human_seconds(e.seconds_per_epoch)} | {e.note} |"
        lines.append(row)
    return "\n".join(lines)


def describe_workload(shape: ModelShape, work: Workload) -> str:
    """Two or three lines: the model and the batch the estimate is for."""
    dtype = {4: "float32", 2: "bfloat16"}[work.dtype_bytes]
    layout = "packed rows" if work.packing else "padded; the epoch's largest micro-batch"
    text = (
        f"model {shape.name}: {human_count(shape.params)} parameters, {shape.model_type}, "
        f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}\n"
        f"device {work.device} ({dtype}); micro-batch {work.batch_size} x {work.seq_len} tokens "
        f"({layout}), {work.supervised_per_batch} supervised; "
        f"gradient_accumulation {work.gradient_accumulation}"
        + ("; gradient checkpointing" if work.gradient_checkpointing else "")
    )
    if work.micro_batches_per_epoch:
        text += (
            f"\nepoch: {work.micro_batches_per_epoch} micro-batches, "
            f"{work.tokens_per_epoch:,} token positions, {work.supervised_per_epoch:,} supervised"
        )
    return text


# -- the choice -------------------------------------------------------------------------------------
QUALITY_LORA = dict(r=16, target_modules="all-linear")
QUICK_LORA = dict(r=8, target_modules=["q_proj", "v_proj"])


@dataclass
class Recommendation:
    choice: Estimate | None
    settings: MethodSettings | None
    reason: str
    candidates: list[Estimate]
    workload: Workload
    shape: ModelShape

    def config_snippet(self) -> str:
        s = self.settings
        if s is None:
            return ""
        lines = ["method:", f"  name: {s.name}"]
        if s.name in ("lora", "qlora"):
            targets = s.target_modules
            shown = targets if isinstance(targets, str) else "[" + ", ".join(targets) + "]"
            lines += [f"  r: {s.r}", f"  lora_alpha: {2 * s.r}", f"  target_modules: {shown}"]
        lines += [
            "training:",
            f"  batch_size: {self.workload.batch_size}",
            f"  gradient_checkpointing: {str(self.workload.gradient_checkpointing).lower()}",
        ]
        return "\n".join(lines)


def _label(s: MethodSettings) -> str:
    if s.name == "full":
        return "full"
    targets = s.target_modules
    where = targets if isinstance(targets, str) else "/".join(t.split("_")[0] for t in targets)
    return f"{s.name} r{s.r} {where}"


def _workload(
    device: str, batch_size: int, max_length: int, checkpointing: bool, supervised: float
) -> Workload:
    return Workload(
        device=device,
        dtype_bytes=2 if device == "cuda" else 4,
        batch_size=batch_size,
        seq_len=max_length,
        supervised_per_batch=int(batch_size * max_length * supervised),
        gradient_checkpointing=checkpointing,
        packing=True,
        mean_row_len=max_length,
    )


def recommend(
    model: str,
    memory: float,
    tasks: int = 1,
    goal: str | None = None,
    device: str = "auto",
    batch_size: int = 4,
    max_length: int = 512,
    supervised_fraction: float = 0.5,
    tflops: float | None = None,
) -> Recommendation:
    """Pick a method for ``model`` within ``memory`` bytes; see the module docstring.

    The batch is ``batch_size`` packed rows of ``max_length`` tokens with ``supervised_fraction``
    of positions supervised. If nothing fits, batch 1 with gradient checkpointing is tried.

    Raises:
        TuneforgeError: bad arguments or an unreadable model.
    """
    if tasks < 1:
        raise TuneforgeError(f"--tasks must be at least 1, got {tasks}")
    if goal is not None and goal not in GOALS:
        raise TuneforgeError(f"--goal must be one of {', '.join(GOALS)}, got '{goal}'")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = model_shape(model)
    rate, _ = matmul_flops_per_second(device, tflops)
    options = {
        "full": MethodSettings("full"),
        "lora": MethodSettings("lora", **QUALITY_LORA),
        "lora-quick": MethodSettings("lora", **QUICK_LORA),
        "qlora": MethodSettings("qlora", **QUALITY_LORA),
    }
    # The methods the choice below can end on: a setup is good enough once one of them fits
    # (LoRA r8 fitting alone does not make QLoRA fit).
    if tasks > 1:
        candidates = ("lora", "qlora")
    elif goal == "quality":
        candidates = ("full", "lora", "qlora")
    elif goal == "speed":
        candidates = ("lora-quick", "qlora")
    else:
        candidates = ("lora", "qlora")
    setups = [(False, batch_size), (True, batch_size), (True, 1)]
    for checkpointing, batch in dict.fromkeys(setups):
        work = _workload(device, batch, max_length, checkpointing, supervised_fraction)
        est = {}
        for key, s in options.items():
            est[key] = estimate_method(shape, work, s, rate)
            est[key].label = _label(s)
        if any(est[k].fits(memory) for k in candidates):
            break
    fits = {k: e.fits(memory) for k, e in est.items()}
    budget = f"{gib(memory)} GiB"
    setup = ""
    if work.gradient_checkpointing:
        names = " or ".join(_label(options[k]) for k in candidates)
        setup = (
            f" (at batch {work.batch_size} with gradient checkpointing: {names} does not fit at "
            f"batch {batch_size} without it)"
        )

    def need(key: str) -> str:
        return f"{gib(est[key].peak)} GiB"

    def over(key: str) -> str:  # why it does not fit
        return f"{need(key)} (+{FIT_MARGIN:.0%} margin) > {budget}"

    def pick(key: str, why: str) -> Recommendation:
        return Recommendation(est[key], options[key], why + setup, list(est.values()), work, shape)

    if not any(fits[k] for k in candidates):
        return Recommendation(
            None,
            None,
            f"nothing fits in {budget}: even QLoRA at batch 1 with gradient checkpointing "
            f"needs {over('qlora')}; use a smaller model, shorter max_length or more memory",
            list(est.values()),
            work,
            shape,
        )
    if tasks > 1:
        key = "lora" if fits["lora"] else "qlora"
        adapter_mb = est[key].trainable * 4 / 2**20
        full_gib = shape.params * work.dtype_bytes / GIB
        why = (
            f"{tasks} tasks: train one adapter per task on one shared base "
            f"({adapter_mb:.0f} MiB each instead of {tasks} full copies of {full_gib:.1f} GiB) and "
            f"serve them together (tuneforge serve BASE --adapters a=RUN_A b=RUN_B)"
        )
        if key == "qlora":
            why += f"; LoRA needs {over('lora')}, so the base is 4-bit"
        return pick(key, why)
    if goal == "quality":
        if fits["full"]:
            return pick(
                "full",
                f"maximum quality: full fine-tuning fits ({need('full')} of {budget}); "
                "every weight can move",
            )
        key = "lora" if fits["lora"] else "qlora"
        return pick(
            key,
            f"maximum quality, but full fine-tuning needs {over('full')}; "
            f"{key} with rank 16 on every linear layer ({need(key)}) comes closest",
        )
    if goal == "speed":
        if fits["lora-quick"]:
            return pick(
                "lora-quick",
                f"quick iteration: LoRA with a small rank (r 8 on q/v, "
                f"{human_count(est['lora-quick'].trainable)} trainable) fits ({need('lora-quick')}) "
                f"at ~{est['lora-quick'].seconds_per_step:.2f} s/step",
            )
        return pick(
            "qlora",
            f"quick iteration wants LoRA, but it needs {over('lora-quick')}; "
            f"QLoRA fits ({need('qlora')})",
        )
    if fits["lora"]:
        return pick(
            "lora",
            f"LoRA r 16 on every linear layer fits ({need('lora')} of {budget}); near full "
            f"fine-tuning quality with {human_count(est['lora'].trainable)} trainable parameters"
            + (
                f" (full fine-tuning also fits at {need('full')}: --goal quality)"
                if fits["full"]
                else ""
            ),
        )
    return pick(
        "qlora",
        f"limited memory: LoRA needs {over('lora')}; QLoRA's 4-bit base brings it to "
        f"{need('qlora')}",
    )
