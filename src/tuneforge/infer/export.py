"""Merge adapters into the base (in fp32) and save a plain HF model folder."""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_folder, check_output_folder
from tuneforge.infer.runs import (
    is_run,
    load_quantized_run_base,
    quantized_run_method,
    run_base_model,
)


def merge(
    run: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """W' = W + scale * B A for every adapted layer, computed in fp32, saved to ``out``.

    The result loads with plain ``transformers`` (no tuneforge, no peft) and gives the same logits
    as the adapter-on model (see ``merged_model``).

    Raises:
        TuneforgeError: not a run with an adapter, or ``out`` exists without ``overwrite``.
    """
    run, out = Path(run), Path(out)
    if is_run(run) and not (run / "adapter" / "adapter_config.json").is_file():
        raise TuneforgeError(
            f"'{run}' was trained with method full; its model/ folder is already merged"
        )
    check_output_folder(out, overwrite)
    merged, tokenizer, _ = merged_model(run)
    target_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype
    ]
    merged = merged.to(target_dtype)
    with atomic_folder(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def merged_model(run: str | Path):
    """(the run's model with its adapter merged, in fp32 on the CPU; its tokenizer; the folder the
    tokenizer was read from). A full fine-tuning run's ``model/`` as saved.

    The base is reloaded in fp32, never merged into rounded weights. A qlora run's base is
    reloaded in 4 bits exactly as trained and dequantized to fp32 (the weights its adapter learned
    against); the merge never goes back into 4-bit weights.

    Raises:
        TuneforgeError: not a run folder, or an adapter whose update is not a weight delta.
    """
    from tuneforge.methods import check_mergeable, load_adapter
    from tuneforge.models import load_model, load_tokenizer

    run = Path(run)
    if not is_run(run):
        raise TuneforgeError(
            f"'{run}' is not a tuneforge run folder (no config.yaml + adapter/ or model/)"
        )
    if not (run / "adapter" / "adapter_config.json").is_file():
        model, tokenizer, _ = load_model(str(run / "model"), dtype="float32", device="cpu")
        return model, tokenizer, run / "model"
    check_mergeable(run / "adapter")
    method = quantized_run_method(run)
    if method is not None:  # qlora: the 4-bit base as trained, dequantized to fp32 (exactly)
        from tuneforge.methods.quantize import dequantize_base

        model, _, _ = load_quantized_run_base(run, method, device="cpu")
        model = dequantize_base(model)
    else:
        model, _, _ = load_model(run_base_model(run), dtype="float32", device="cpu")
    model = load_adapter(model, str(run / "adapter"))
    return model.merge_and_unload(), load_tokenizer(str(run / "adapter")), run / "adapter"
