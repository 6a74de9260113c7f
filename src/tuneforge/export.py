"""Merge adapters into the base (in fp32) and save a plain HF model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.runs import is_run, load_quantized_run_base, quantized_run_method, run_base_model


def merge(
    run: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """W' = W + scale * B A for every adapted layer, computed in fp32, saved to ``out``.

    The result loads with plain ``transformers`` (no tuneforge, no peft) and gives the same logits
    as the adapter-on model. The base is reloaded in fp32, never merged into rounded weights.
    A qlora run's base is reloaded in 4 bits exactly as trained and dequantized to fp32 (the
    weights its adapter learned against); the merge never goes back into 4-bit weights.

    Raises:
        TuneforgeError: not a run with an adapter, or ``out`` exists without ``overwrite``.
    """
    from tuneforge.methods import check_mergeable, load_adapter
    from tuneforge.models import load_model, load_tokenizer

    run, out = Path(run), Path(out)
    if not is_run(run):
        raise TuneforgeError(f"'{run}' is not a tuneforge run folder (no config.yaml + adapter/)")
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise TuneforgeError(
            f"'{run}' was trained with method full; its model/ folder is already merged"
        )
    check_mergeable(run / "adapter")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise TuneforgeError(f"'{out}' already exists; pass --overwrite to replace it")
    method = quantized_run_method(run)
    if method is not None:  # qlora: the 4-bit base as trained, dequantized to fp32 (exactly)
        from tuneforge.methods.quantize import dequantize_base

        model, _, _ = load_quantized_run_base(run, method, device="cpu")
        model = dequantize_base(model)
    else:
        model, _, _ = load_model(run_base_model(run), dtype="float32", device="cpu")
    model = load_adapter(model, str(run / "adapter"))
    merged = model.merge_and_unload()
    target_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype
    ]
    merged = merged.to(target_dtype)
    tokenizer = load_tokenizer(str(run / "adapter"))
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
