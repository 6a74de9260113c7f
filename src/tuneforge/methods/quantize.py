"""QLoRA's frozen base: linear layers held in 4 bits by bitsandbytes (Dettmers et al. 2023).

Each linear weight is cut into blocks of 64 values; a block stores one 4-bit code per value (NF4,
the quantiles of a normal distribution, or FP4) and one absmax scale. With double quantization
the scales are quantized again, to 8 bits in blocks of 256, leaving one fp32 scale per 256 blocks
and one offset. For every matmul the weights are dequantized to ``compute_dtype``. The token
embedding and the LM head (one copy when tied) are quantized the same way by quantize_embed.py
when ``method.quantize_embeddings`` (the default); norms stay in ``training.dtype``. LoRA
adapters on top are fp32 and are the only weights that train.
"""

from __future__ import annotations

import dataclasses
import logging
from math import prod
from pathlib import Path

import torch

from tuneforge.config import MethodConfig
from tuneforge.errors import TuneforgeError

MIN_BITSANDBYTES = (0, 45)
INSTALL = "pip install 'tuneforge[qlora]' (bitsandbytes>=0.45)"
# Below this share of the decoder's weights in 4 bits, a "4-bit base" is mostly full precision.
MIN_QUANTIZED_SHARE = 0.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_bitsandbytes(needed_by: str = "method qlora", instead: str = "method.name: lora"):
    """The ``bitsandbytes`` module, or a TuneforgeError saying why ``needed_by`` cannot use it
    and to use ``instead``."""
    # Its CPU backend logs a warning at import about an optional hub kernel it cannot fetch.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise TuneforgeError(
            f"{needed_by} needs bitsandbytes, which is not installed: {INSTALL}, or use {instead}"
        ) from None
    except Exception as e:  # a broken install (missing native library, CUDA mismatch)
        raise TuneforgeError(
            f"{needed_by}: bitsandbytes is installed but failed to load ({_first_line(e)}); "
            f"reinstall it ({INSTALL}) or use {instead}"
        ) from None
    version = tuple(int(x) for x in bitsandbytes.__version__.split(".")[:2] if x.isdigit())
    if version < MIN_BITSANDBYTES:
        raise TuneforgeError(
            f"{needed_by}: bitsandbytes {bitsandbytes.__version__} is too old (CPU support and "
            f"this code need 0.45); {INSTALL}, or use {instead}"
        )
    return bitsandbytes


def check_4bit_runs(device: torch.device, method: MethodConfig) -> None:
    """Quantize and dequantize a small matrix on ``device``: can bitsandbytes run there?

    Raises:
        TuneforgeError: bitsandbytes is missing, too old, or has no 4-bit kernels for the device.
    """
    bnb = import_bitsandbytes()
    try:
        w = torch.linspace(-1, 1, 256, device=device).reshape(4, 64)
        packed, state = bnb.functional.quantize_4bit(
            w, blocksize=64, compress_statistics=method.double_quant, quant_type=method.quant_type
        )
        back = bnb.functional.dequantize_4bit(packed, state)
    except Exception as e:  # bitsandbytes raises many types for "no kernel for this device"
        raise TuneforgeError(
            f"bitsandbytes {bnb.__version__} cannot run {method.quant_type} 4-bit weights on "
            f"{device} ({_first_line(e)}); run on a CPU or CUDA GPU, or use method.name: lora"
        ) from None
    if not torch.isfinite(back).all() or (back - w).abs().max() > 0.25:
        raise TuneforgeError(
            f"bitsandbytes {bnb.__version__} gives wrong 4-bit results on {device}; "
            "reinstall it or use method.name: lora"
        )


def bnb_config(method: MethodConfig):
    """The ``transformers.BitsAndBytesConfig`` for ``method`` (quant_type, double_quant, compute)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=DTYPES[method.compute_dtype],
    )


def load_quantized_model(
    ref: str,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
    *,
    method: MethodConfig,
):
    """``(model, tokenizer, resolved)`` as ``models.load_model``, with every decoder linear layer
    held in 4 bits as ``method`` says (quant_type, double_quant, compute_dtype).

    Raises:
        TuneforgeError: bitsandbytes cannot run here, the model is a GGUF file, or too little of
            the model is made of linear layers that bitsandbytes can quantize.
    """
    from tuneforge.models import load_model, pick_device, pick_dtype, resolve_model

    dev = pick_device(device)
    if method.compute_dtype == "auto":  # the run's own compute dtype (training.dtype resolved)
        resolved_dtype = str(pick_dtype(dtype, dev)).removeprefix("torch.")
        method = dataclasses.replace(method, compute_dtype=resolved_dtype)
    check_4bit_runs(dev, method)
    if Path(resolve_model(ref)).suffix == ".gguf":
        raise TuneforgeError(
            f"model '{ref}': a GGUF file cannot be loaded into a 4-bit base (transformers only "
            "dequantizes GGUF); save it as an HF folder first (from_pretrained with gguf_file, "
            "then save_pretrained) or use method.name: lora"
        )
    model, tokenizer, resolved = load_model(
        ref, dtype, device, trust_remote_code, attn_implementation, quantization=bnb_config(method)
    )
    check_quantized(model, ref)
    keep_compute_dtype(model)
    if method.quantize_embeddings:
        from tuneforge.methods.quantize_embed import quantize_embeddings

        quantize_embeddings(model, method)
    copy_out_of_checkpoint(model)
    return model, tokenizer, resolved


@torch.no_grad()
def copy_out_of_checkpoint(model: torch.nn.Module) -> None:
    """Copy the weights left in full precision (norms; embeddings when not quantized) off the
    memory-mapped checkpoint, on CPU.

    They are zero-copy views of the mapped file, which quantization read in full: while any view
    lives, all its pages stay resident and count in the process's memory (~540 MB for the
    built-in fp32 model, measured: 642 MiB above the pre-load RSS instead of 129 MiB after this,
    norms being the only views left). A GPU load copies them off the file anyway.
    """
    params_4bit = import_bitsandbytes().nn.Params4bit
    for p in model.parameters():  # shared (tied) parameters come once
        if p.device.type == "cpu" and not isinstance(p, params_4bit):
            p.data = p.data.clone()


def linear_4bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every bitsandbytes 4-bit linear layer."""
    linear_4bit = import_bitsandbytes().nn.Linear4bit
    return [(n, m) for n, m in model.named_modules() if isinstance(m, linear_4bit)]


def check_quantized(model: torch.nn.Module, ref: str) -> None:
    """Refuse a model whose decoder is mostly weights bitsandbytes cannot quantize.

    bitsandbytes quantizes ``nn.Linear`` layers only. Some architectures keep most weights
    elsewhere (transformers 5 stores mixture-of-experts weights as 3-D tensors, not linear
    layers); a "4-bit" base of such a model would stay mostly in full precision.

    Raises:
        TuneforgeError: no 4-bit layer at all, or under half of the decoder's weights in 4 bits.
    """
    layers = linear_4bit_layers(model)
    if not layers:
        raise TuneforgeError(
            f"model '{ref}': has no linear layers bitsandbytes can quantize (the embeddings and "
            "LM head stay in full precision by design); use method.name: lora"
        )
    quantized = sum(prod(m.weight.quant_state.shape) for _, m in layers)
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    skip = {id(p) for m in embeddings if m is not None for p in m.parameters()}
    left = {
        n: p for n, p in model.named_parameters() if id(p) not in skip and p.dtype.is_floating_point
    }
    share = quantized / (quantized + sum(p.numel() for p in left.values()))
    if share < MIN_QUANTIZED_SHARE:
        biggest = max(left, key=lambda n: left[n].numel())
        raise TuneforgeError(
            f"model '{ref}': only {100 * share:.0f}% of its decoder weights are in linear layers "
            f"bitsandbytes can quantize (the rest, e.g. {biggest} {tuple(left[biggest].shape)}, "
            "would stay in full precision); use method.name: lora"
        )


def keep_compute_dtype(model: torch.nn.Module) -> None:
    """Keep every 4-bit matmul on bitsandbytes' plain path: dequantize to compute_dtype, matmul.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a layer's weights for a fused bf16
    kernel the first time it runs in eval mode. The repack rounds the scales to bf16, drops
    double quantization and computes in bf16 whatever compute_dtype says, and a training step
    after an evaluation then runs through that kernel, which has no backward: the gradient to
    the layer's input is silently lost (checked here with bitsandbytes 0.50.2). Turning it off
    keeps training, evaluation, resume and merge on the same numbers.
    """
    for _, module in linear_4bit_layers(model):
        module.support_avx512bf16_for_cpu = False


def apply_qlora(model: torch.nn.Module, cfg: MethodConfig) -> torch.nn.Module:
    """LoRA adapters (fp32) on a base loaded by ``load_quantized_model``; only they train."""
    from tuneforge.methods.peft_methods import apply_lora

    if not getattr(model, "is_loaded_in_4bit", False):
        raise TuneforgeError("method qlora needs the base loaded in 4 bits (methods.load_base)")
    model = apply_lora(model, cfg)  # peft freezes the base and keeps adapters in fp32
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


@torch.no_grad()
def dequantize_base(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every 4-bit layer by an fp32 ``nn.Linear`` holding exactly the weights the 4-bit
    layer computes with (codes x scales, in fp32); the model then saves as a plain HF model.

    This is the base a QLoRA adapter was trained against; merging into it (in fp32) and never
    into the rounded 4-bit weights keeps the merged model's logits those of adapter-on-4-bit.
    """
    from tuneforge.methods.quantize_embed import dequantize_embeddings

    bnb = import_bitsandbytes()
    dequantize_embeddings(model)
    for name, module in linear_4bit_layers(model):
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        linear = torch.nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=weight.device,
            dtype=torch.float32,
        )
        linear.weight.copy_(weight.float())
        if module.bias is not None:
            linear.bias.copy_(module.bias.float())
        model.set_submodule(name, linear)
    if getattr(model, "hf_quantizer", None) is not None:  # forget the quantizer: saves plain
        model.hf_quantizer.remove_quantization_config(model)
    model.is_loaded_in_4bit = False
    return model.float()


def base_footprint(model: torch.nn.Module) -> dict[str, int]:
    """Bytes the frozen base holds in memory, tensor by tensor (a shared tensor counted once).

    ``linear_*``: the decoder's linear layers (the LM head excluded) — when quantized, the packed
    4-bit codes plus every quantization constant (absmax, code tables, nested absmax, offset).
    ``other_*``: everything else (embeddings, norms, head, buffers such as rotary frequencies);
    a 4-bit embedding / head (``quantize_embeddings``) with its quantization constants.
    ``*_params`` count the weights of the original model.
    """
    seen: set[tuple[int, int]] = set()

    def nbytes(t) -> int:
        if not torch.is_tensor(t):
            return 0
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()

    out = dict(linear_params=0, linear_bytes=0, other_params=0, other_bytes=0)
    head = model.get_output_embeddings()
    in_linear: set[int] = set()
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear) or m is head:
            continue
        tensors = [m.weight, m.bias]
        params = m.weight.numel()
        qs = getattr(m.weight, "quant_state", None)
        if qs is not None:  # a bitsandbytes 4-bit layer
            params = prod(qs.shape)
            tensors += _quant_constants(qs)
        out["linear_params"] += params + (m.bias.numel() if m.bias is not None else 0)
        out["linear_bytes"] += sum(nbytes(t) for t in tensors)
        in_linear |= {id(p) for p in m.parameters()}
    for p in model.parameters():
        if id(p) in in_linear:
            continue
        qs = getattr(p, "quant_state", None)  # a 4-bit embedding / head (quantize_embeddings)
        if size := nbytes(p):
            out["other_params"] += p.numel() if qs is None else prod(qs.shape)
            out["other_bytes"] += size + (sum(nbytes(t) for t in _quant_constants(qs)) if qs else 0)
    out["other_bytes"] += sum(nbytes(b) for b in model.buffers())
    return out


def _quant_constants(qs) -> list:
    """The tensors a bitsandbytes QuantState holds besides the codes (absmax, code tables,
    nested absmax, offset)."""
    out = [qs.absmax, qs.code, getattr(qs, "offset", None)]
    if qs.nested:
        out += [qs.state2.absmax, qs.state2.code]
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
