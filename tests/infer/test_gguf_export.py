"""`tuneforge export --format gguf`: the file holds the model, tokenizer and chat template that
llama.cpp expects, checked against the built-in model's own GGUF file and against llama.cpp."""

import shutil

import gguf
import numpy as np
import pytest
import torch

from tuneforge.infer.export import merged_model
from tuneforge.infer.gguf_export import _rotary_rows, export_gguf
from tuneforge.models import _builtin_gguf, resolve_model

from ..conftest import ROOT, run_cli, train_tiny_run


def full_run_of(model: str, root):
    """A run folder holding ``model`` as a full fine-tuning run's model/ (no training)."""
    run = root / "run"
    shutil.copytree(resolve_model(model), run / "model")
    (run / "config.yaml").write_text(
        f"model: {model}\noutput_dir: {run}\nmethod:\n  name: full\n"
        f"data:\n  train: {ROOT / 'examples/dates/train.jsonl'}\n  system_prompt: Be brief.\n"
    )
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # what eval reads
    return run


def fields(reader: gguf.GGUFReader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        try:
            out[name] = f.contents()
        except Exception:  # noqa: BLE001 - a field type contents() cannot read back
            continue
    return out


@pytest.mark.slow
def test_f32_export_of_the_builtin_model_equals_its_own_gguf_file(tmp_path):
    """The built-in model ships as a GGUF file (Q4_1) that transformers dequantized for us.
    Exporting it again must give the same tensors (names, layout, the rotary row order of the
    query and key projections) and the same tokenizer metadata llama.cpp reads."""
    run = full_run_of("smollm2-135m-instruct", tmp_path)
    done = export_gguf(run, tmp_path / "out", quant="f32")
    assert done.gguf.name == "run.f32.gguf"
    ours, theirs = gguf.GGUFReader(str(done.gguf)), gguf.GGUFReader(str(_builtin_gguf()))
    mine = {t.name: t for t in ours.tensors}
    assert sorted(mine) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        got = np.asarray(mine[t.name].data, dtype=np.float32).reshape(-1)
        assert np.array_equal(got, expected), t.name
    a, b = fields(ours), fields(theirs)
    for key in (
        "general.architecture",
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.dimension_count",
        "llama.vocab_size",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ):
        assert a[key] == b[key], key
    assert a["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>: what training ended turns with
    assert done.modelfile.read_text() == (
        "FROM ./run.f32.gguf\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n'
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
        '"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'SYSTEM """Be brief."""\n'
    )


def test_f16_export_of_a_lora_run_holds_the_merged_weights(tmp_path):
    """tiny-llama LoRA: the file's tensors are the fp32 merge (rounded to f16, norms in f32)."""
    run = train_tiny_run(tmp_path, "lora", "apple")
    done = export_gguf(run, tmp_path / "out", quant="f16")
    merged, _, _ = merged_model(run)
    state = merged.state_dict()
    cfg = merged.config
    tensors = {t.name: t for t in gguf.GGUFReader(str(done.gguf)).tensors}
    assert "output.weight" not in tensors  # the tied head is stored once
    layer = 1
    for hf, name, heads in (
        ("model.embed_tokens.weight", "token_embd.weight", None),
        (f"model.layers.{layer}.self_attn.q_proj.weight", f"blk.{layer}.attn_q.weight", 1),
        (f"model.layers.{layer}.self_attn.k_proj.weight", f"blk.{layer}.attn_k.weight", 2),
        (f"model.layers.{layer}.self_attn.v_proj.weight", f"blk.{layer}.attn_v.weight", None),
        (f"model.layers.{layer}.mlp.down_proj.weight", f"blk.{layer}.ffn_down.weight", None),
        (f"model.layers.{layer}.input_layernorm.weight", f"blk.{layer}.attn_norm.weight", None),
    ):
        t = tensors[name]
        want = state[hf].float()
        if heads == 1:
            want = _rotary_rows(want, cfg.num_attention_heads)
        elif heads == 2:
            want = _rotary_rows(want, cfg.num_key_value_heads)
        got = torch.from_numpy(np.asarray(t.data).astype(np.float32)).reshape(want.shape)
        if want.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and got.equal(want), name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            assert got.equal(want.half().float()), name
    # the LoRA update is in the file: q_proj differs from the base's
    base = gguf.GGUFReader(
        str(export_gguf(full_run_of("tiny-llama", tmp_path / "b"), tmp_path / "bo").gguf)
    )
    q = f"blk.{layer}.attn_q.weight"
    assert not np.array_equal(
        np.asarray(tensors[q].data), np.asarray({t.name: t for t in base.tensors}[q].data)
    )


def test_export_refuses_bad_requests_in_one_line(tmp_path):
    run = full_run_of("tiny-llama", tmp_path)
    r = run_cli("export", str(run), "--quant", "q3_x", "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --quant q3_x: not a GGUF type tuneforge writes; use one of f32, f16, bf16, "
        "q8_0, q4_0, q4_k_m, q5_k_m, q6_k"
    ]
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    r = run_cli("export", str(run), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]
    qwen = full_run_of("tiny-qwen2", tmp_path / "q")  # its tokenizer's pre-tokenizer is unnamed
    r = run_cli("export", str(qwen), "--out", str(tmp_path / "qout"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "pre-tokenizer is not one tuneforge can name" in r.stderr
    assert not (tmp_path / "qout").exists()


def test_quantized_types_without_llama_cpp_are_one_line(monkeypatch):
    """Without the gguf extra, float exports still work; quantized ones say what to install."""
    import sys

    from tuneforge.errors import TuneforgeError
    from tuneforge.infer.gguf_export import check_quant

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now fails
    check_quant("f16")
    with pytest.raises(TuneforgeError, match=r"install tuneforge\[gguf\]"):
        check_quant("q4_k_m")
