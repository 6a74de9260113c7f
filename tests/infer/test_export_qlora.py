"""A qlora run: its adapter is PEFT-format and loads onto a 4-bit base with plain peft (same
logits), load_for_inference gives that model, and merge dequantizes the base and merges in fp32."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.infer.export import merge
from tuneforge.infer.runs import load_for_inference
from tuneforge.train import train

from ..conftest import tiny_config, write_jsonl


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    rows = [{"instruction": f"Repeat {i}", "output": f"{i} {i}"} for i in range(16)]
    cfg = tiny_config(
        tmp,
        write_jsonl(tmp / "t.jsonl", rows),
        **{
            "method.name": "qlora",
            "training.max_steps": 4,
            "training.learning_rate": 1e-2,
            "method.target_modules": "all-linear",
        },
    )
    train(cfg)
    return tmp / "run"


def probe_ids():
    return torch.tensor([[1, 520, 33, 4000, 17, 9, 880, 2, 1, 77]])


@torch.no_grad()
def test_peft_loads_our_adapter_onto_a_4bit_base_with_identical_logits(qlora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneforge.config import MethodConfig
    from tuneforge.methods.quantize_embed import quantize_embeddings
    from tuneforge.models import resolve_model

    config = json.loads((qlora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    ours, _ = load_for_inference(str(qlora_run))
    assert getattr(ours.get_base_model(), "is_loaded_in_4bit", False)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model("tiny-llama"), quantization_config=q, dtype=torch.float32, device_map="cpu"
    )
    for m in base.modules():  # bitsandbytes' bf16 eval kernel on AVX512-BF16 CPUs: off, as ours
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    # transformers quantizes linear layers only; the run also held its embedding + tied head in
    # 4 bits (method.quantize_embeddings, the default): the same function does that here.
    quantize_embeddings(base, MethodConfig(name="qlora"))
    base.eval()
    base_logits = base(probe_ids()).logits
    theirs = PeftModel.from_pretrained(base, str(qlora_run / "adapter")).eval()
    a, b = ours(probe_ids()).logits, theirs(probe_ids()).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - base_logits).abs().max() > 1e-3  # the adapter really changes the model


def test_merge_dequantizes_then_merges_in_fp32(qlora_run, tmp_path):
    """Compared: logits of the merged fp32 model vs the adapter on the 4-bit base (what training
    optimised), on the same ids. Both use bitwise the same base weights (dequantized codes x
    scales, see test_quantize); they differ only in where the LoRA term is added, x·Wᵀ +
    s·(x·Aᵀ)·Bᵀ vs x·(W + s·BA)ᵀ, each rounded in fp32 (eps 1.2e-7) through 2 layers, so the
    gap is float rounding: atol 1e-5 on logits of size ~1 (as for LoRA's merge test). A merge into the original
    full-precision weights instead (W_fp32 + s·BA, not the base that was trained) is off by the
    quantization error, which is checked to be far larger."""
    from transformers import AutoModelForCausalLM

    from tuneforge.models import resolve_model

    out = merge(qlora_run, tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    with torch.no_grad():
        on_4bit, _ = load_for_inference(str(qlora_run))
        expected = on_4bit(probe_ids()).logits
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(probe_ids()).logits
        from peft import PeftModel

        full = AutoModelForCausalLM.from_pretrained(
            resolve_model("tiny-llama"), dtype=torch.float32
        )
        into_full = PeftModel.from_pretrained(full, str(qlora_run / "adapter")).merge_and_unload()
        wrong = into_full(probe_ids()).logits
    # the tied embedding/head is saved once, as the exact table the 4-bit run computed with
    assert config["tie_word_embeddings"] and "lm_head.weight" not in weights
    from tuneforge.methods.quantize_embed import dequantize_weight

    table = on_4bit.get_base_model().get_input_embeddings().weight
    assert torch.equal(weights["model.embed_tokens.weight"], dequantize_weight(table))
    gap = (merged - expected).abs().max().item()
    quantization_gap = (wrong - expected).abs().max().item()
    print(f"merged vs adapter-on-4-bit: max |logit diff| {gap:.2e} (tolerance 1e-5); merged into "
          f"the unquantized base instead: {quantization_gap:.2e}")  # fmt: skip
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
    assert quantization_gap > 100 * max(gap, 1e-7)
    again = merge(qlora_run, tmp_path / "merged", overwrite=True)  # merging twice is safe
    for k, v in load_file(str(again / "model.safetensors")).items():
        assert torch.equal(v, weights[k]), k
