"""GGUF export for llama.cpp, Ollama and LM Studio: the merged model, its tokenizer, the run's chat
template and end-of-turn tokens in one file, plus an Ollama ``Modelfile``.

The file format and the tensor names come from the ``gguf`` package (llama.cpp's own Python
library); the k-quants come from llama.cpp's quantizer (``llama_model_quantize`` through
``llama-cpp-python``, the ``tuneforge[gguf]`` extra). Nothing here re-implements either.

How a model becomes a GGUF file (what llama.cpp's ``convert_hf_to_gguf.py`` does for these
architectures): the hyperparameters under ``<arch>.*`` keys; every weight renamed by
``gguf.get_tensor_name_map``; for Llama, the query and key projections' rows reordered from the
HF rotary layout (two halves) to llama.cpp's (interleaved pairs); 1-D tensors (norms, biases) kept
in float32; the tied LM head stored once (``token_embd``). The tokenizer: the BPE vocabulary with
token types, the merges and special ids (``gguf.SpecialVocab``), the pre-tokenizer named by the
hash llama.cpp uses to recognise it, and the chat template the run trained with. Its end-of-turn
token becomes the end-of-turn id llama.cpp stops at.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_folder, check_output_folder

# quant name -> how it is written: directly by gguf (float types) or by llama.cpp's quantizer
FLOAT_TYPES = ("f32", "f16", "bf16")
LLAMA_CPP_TYPES = ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
QUANTS = FLOAT_TYPES + LLAMA_CPP_TYPES

# HF ``model_type`` -> (gguf architecture name, query/key rows reordered for llama.cpp's rotary)
ARCHITECTURES = {"llama": ("LLAMA", True), "qwen2": ("QWEN2", False)}

# llama.cpp names a BPE pre-tokenizer by the sha256 of the token ids of this text (its
# convert_hf_to_gguf.py, get_vocab_base_pre); the text and hashes are that protocol's data.
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````"
    "\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


@dataclass
class Exported:
    gguf: Path
    modelfile: Path
    note: str = ""  # what llama.cpp's quantizer had to say (fallback types)


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise TuneforgeError(
            f"--quant {quant}: not a GGUF type tuneforge writes; use one of {', '.join(QUANTS)}"
        )
    if quant in LLAMA_CPP_TYPES:
        llama_cpp_module()


def llama_cpp_module():
    """``llama_cpp`` (llama.cpp's quantizer and runtime), or one line on how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise TuneforgeError(
            "quantized GGUF types and running GGUF files need llama-cpp-python: install "
            "tuneforge[gguf] (`make install` does); f32, f16 and bf16 exports work without it"
        ) from None
    return llama_cpp


def pre_tokenizer(tokenizer) -> str:
    """The name llama.cpp gives this tokenizer's pre-tokenizer."""
    ids = tokenizer.encode(_CHECK_TEXT)  # as llama.cpp does (with a BOS if the tokenizer adds one)
    digest = sha256(str(ids).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise TuneforgeError(
            "GGUF export: the tokenizer's pre-tokenizer is not one tuneforge can name for "
            f"llama.cpp (hash {digest[:12]}); supported: {', '.join(sorted(PRE_TOKENIZERS.values()))}"
        )
    return PRE_TOKENIZERS[digest]


def _rotary_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query / key projection from HF's rotary layout (each head's first half of
    dimensions, then its second) to llama.cpp's (interleaved pairs)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) for every weight of a merged HF model, in llama.cpp's layout."""
    import gguf

    cfg = model.config
    arch_name, reorder = ARCHITECTURES[cfg.model_type]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_name), cfg.num_hidden_layers)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # stored once, as token_embd
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TuneforgeError(f"GGUF export: no GGUF name for tensor {name}")
        t = t.detach().to(torch.float32)
        if reorder and name.endswith("self_attn.q_proj.weight"):
            t = _rotary_rows(t, heads)
        elif reorder and name.endswith("self_attn.k_proj.weight"):
            t = _rotary_rows(t, kv_heads)
        out.append((target, t))
    return out


def _vocabulary(tokenizer, size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..size-1 (unused ids padded)."""
    import gguf

    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(model, tokenizer, tokenizer_dir: Path, path: Path, dtype: str, name: str) -> None:
    """A float GGUF file (f32, f16 or bf16 weights; 1-D tensors in f32) for ``model``."""
    import gguf

    from tuneforge.data.render import adds_bos, end_of_turn_ids

    cfg = model.config
    arch_name, _ = ARCHITECTURES[cfg.model_type]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_name)])
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    }[dtype]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", "default") not in ("default", None):
        raise TuneforgeError(
            f"GGUF export: rope scaling {rope['rope_type']} is not written by tuneforge yet"
        )
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)

    tokens, types = _vocabulary(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    special.chat_template = None  # the run's own template, below
    special.add_special_token.pop("bos", None)  # measured on the tokenizer, below
    special.add_to_gguf(writer)
    writer.add_chat_template(tokenizer.chat_template)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_eot_token_id(end_of_turn_ids(tokenizer)[0])  # what training ended turns with

    for target, t in gguf_tensors(model):
        data = t.numpy()
        if data.ndim == 1 or dtype == "f32":
            writer.add_tensor(target, data.astype(np.float32))
        elif dtype == "f16":
            writer.add_tensor(target, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(target, q, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_gguf(src: Path, dst: Path, quant: str) -> str:
    """llama.cpp's quantizer: ``src`` (an f32 GGUF file) -> ``dst`` in ``quant``. Returns its
    note on tensors that needed a fallback type (k-quants need rows that are a multiple of 256),
    or ""; llama.cpp's log lines are kept off the terminal."""
    import re

    from llama_cpp import _logger

    llama_cpp = llama_cpp_module()
    log: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        log.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = os.cpu_count() or 1
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), ctypes.byref(params)
        )
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    text = "".join(log)
    if rc != 0 or not dst.is_file():
        last = text.strip().splitlines()[-1] if text.strip() else f"status {rc}"
        raise TuneforgeError(f"GGUF export: llama.cpp's quantizer failed for {quant} ({last})")
    m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback quantization", text)
    if not m:
        return ""
    return (
        f"{m.group(1)} of {m.group(2)} tensors took llama.cpp's fallback type (their rows are not "
        "a multiple of the k-quant block of 256)"
    )


def modelfile(gguf_name: str, tokenizer, system: str | None) -> str:
    """An Ollama Modelfile: the file, the chat format, the end-of-turn stop strings."""
    from tuneforge.data.render import end_of_turn_ids

    stops = [tokenizer.decode([i]) for i in end_of_turn_ids(tokenizer)]
    lines = [f"FROM ./{gguf_name}"]
    if "<|im_start|>" in (tokenizer.chat_template or ""):  # ChatML, in Ollama's template language
        lines += [
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
            "{{ .Content }}<|im_end|>",
            "{{ end }}<|im_start|>assistant",
            '"""',
        ]
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops) if s]
    if system:
        lines.append('SYSTEM """' + system.replace('"""', '\\"\\"\\"') + '"""')
    return "\n".join(lines) + "\n"


def export_gguf(
    run: str | Path, out: str | Path, quant: str = "f16", overwrite: bool = False
) -> Exported:
    """``out/NAME.QUANT.gguf`` and ``out/Modelfile`` for a run (adapters merged in fp32, qlora
    bases dequantized first; full runs as saved).

    Raises:
        TuneforgeError: an unknown quant, an architecture or tokenizer GGUF cannot hold here,
            llama-cpp-python missing for a quantized type, ``out`` exists without ``overwrite``.
    """
    import yaml

    from tuneforge.infer.export import merged_model

    run, out = Path(run), Path(out)
    check_quant(quant)
    check_output_folder(out, overwrite)
    model, tokenizer, tokenizer_dir = merged_model(run)
    if model.config.model_type not in ARCHITECTURES:
        raise TuneforgeError(
            f"GGUF export: architecture {model.config.model_type} is not supported yet "
            f"(supported: {', '.join(ARCHITECTURES)}); use `tuneforge merge` for a HF folder"
        )
    pre_tokenizer(tokenizer)  # refuse before writing anything
    name = run.resolve().name
    file_name = f"{name}.{quant}.gguf"
    # the run's config as saved, not re-validated: its data paths need not exist here
    system = (
        (yaml.safe_load((run / "config.yaml").read_text()) or {})
        .get("data", {})
        .get("system_prompt")
    )
    note = ""
    with atomic_folder(out) as tmp:
        if quant in FLOAT_TYPES:
            write_gguf(model, tokenizer, tokenizer_dir, tmp / file_name, quant, name)
        else:
            source = tmp / ".f32.gguf"
            write_gguf(model, tokenizer, tokenizer_dir, source, "f32", name)
            note = quantize_gguf(source, tmp / file_name, quant)
            source.unlink()
        (tmp / "Modelfile").write_text(modelfile(file_name, tokenizer, system))
    return Exported(out / file_name, out / "Modelfile", note)


@dataclass
class GGUFReply:
    text: str
    stopped: bool  # ended at an end-of-turn token, not at max_new_tokens


def gguf_replies(
    path: str | Path, conversations: list[list[dict]], max_new_tokens: int = 128
) -> list[GGUFReply]:
    """Greedy replies from a GGUF file run by llama.cpp itself, with the chat template stored in
    the file: what a user of llama.cpp, Ollama or LM Studio gets."""
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=2048,
        n_threads=os.cpu_count() or 1,
        verbose=False,
        seed=0,
    )
    out = []
    for messages in conversations:
        r = llm.create_chat_completion(
            messages=messages,
            max_tokens=max_new_tokens,
            temperature=0.0,
            top_k=1,
            repeat_penalty=1.0,
        )
        choice = r["choices"][0]
        out.append(GGUFReply(choice["message"]["content"] or "", choice["finish_reason"] == "stop"))
    llm.close()
    return out
