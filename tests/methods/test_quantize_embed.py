"""QLoRA with the token embedding and tied LM head in 4 bits (methods/quantize_embed.py): what
is stored, that lookup and head compute with exactly the dequantized table, that the selective
loss gives the plain loss's numbers, and that old runs keep their full-precision embeddings."""

import pytest
import torch
import torch.nn.functional as F
import yaml

from tuneforge.config import MethodConfig
from tuneforge.data.batching import collate_padded
from tuneforge.infer.runs import quantized_run_method
from tuneforge.losses import causal_lm_loss_sum
from tuneforge.methods import apply_method, trainable_parameters
from tuneforge.methods.quantize import base_footprint, dequantize_base, load_quantized_model
from tuneforge.methods.quantize_embed import QuantizedEmbedding, QuantizedHead, dequantize_weight
from tuneforge.models import load_model
from tuneforge.train.sft import SFTObjective

from .test_quantize import QLORA, TINY_LINEARS, gradients_after_one_step, load_tiny, samples

VOCAB, HIDDEN = 49152, 64  # tiny-llama


@pytest.mark.parametrize("double_quant", [True, False])
def test_embedding_and_tied_head_share_one_4bit_copy_counted_by_hand(double_quant):
    """The 49152 x 64 table, tied with the head, stored once: 4-bit codes (n/2 bytes) + one absmax
    per block of 64 (uint8 with double quant, plus 49152 / 256 = 192 fp32 second-level scales, a
    256-entry fp32 code table and an fp32 offset; fp32 without) + the 16-entry NF4 table."""
    model, _ = load_tiny(double_quant=double_quant)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and isinstance(head, QuantizedHead)
    assert head.weight is embedding.weight  # tied: one parameter, one copy of the codes
    n = VOCAB * HIDDEN
    blocks = n // 64
    table = n // 2 + 64 + (blocks + 192 * 4 + 1024 + 4 if double_quant else 4 * blocks)
    fp = base_footprint(model)
    assert fp["other_bytes"] == table + 4 * (5 * 64 + 2 * 8)  # + 5 norms, 2 rotary buffers
    assert fp["other_params"] == n + 5 * 64
    assert trainable_parameters(model)[1] == sum(TINY_LINEARS) + n + 5 * 64
    whole = (fp["linear_bytes"] + fp["other_bytes"]) / (fp["linear_params"] + fp["other_params"])
    assert whole <= (0.6 if double_quant else 0.57)  # 0.521 / 0.563: whole model, constants in


def test_lookup_and_head_compute_with_exactly_the_dequantized_table():
    """Row lookup dequantizes only the rows it picks, bitwise the rows of the full table; the
    head multiplies by the full table in compute_dtype."""
    model, _ = load_tiny()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = dequantize_weight(embedding.weight)
    assert table.shape == (VOCAB, HIDDEN) and table.dtype == torch.float32
    ids = torch.tensor([[0, 5, 49151, 5], [1200, 3, 77, 40000]])
    with torch.no_grad():
        assert torch.equal(embedding(ids), F.embedding(ids, table))
        x = torch.randn(3, HIDDEN)
        assert torch.equal(head(x), F.linear(x, table))
        bf16, _ = load_tiny(compute_dtype="bfloat16")
        out = bf16.get_output_embeddings()(x)
        assert out.dtype == torch.float32  # computed in bf16, returned in the input's dtype
        torch.testing.assert_close(out, F.linear(x.bfloat16(), table.bfloat16()).float())


@torch.no_grad()
def test_logits_match_the_dequantized_fp32_model_and_stay_near_the_original():
    """Reference: the same model with every 4-bit weight (linear layers, embedding, head)
    dequantized to plain fp32 modules. Same weights, so only fp32 summation order may differ:
    atol 1e-5 on logits of size ~1. Against the original unquantized model the gap is the
    quantization error, printed, and far larger."""
    ids = torch.tensor([[1, 520, 33, 4000, 17, 9, 880, 2, 1, 77]])
    model, _ = load_tiny()
    model.eval()
    quantized = model(ids).logits
    reference = dequantize_base(model)
    assert type(reference.get_input_embeddings()) is torch.nn.Embedding
    assert reference.get_output_embeddings().weight is reference.get_input_embeddings().weight
    dequantized = reference(ids).logits
    original, _, _ = load_model("tiny-llama", "float32", "cpu")
    unquantized = original(ids).logits
    gap = (quantized - dequantized).abs().max().item()
    quantization_error = (quantized - unquantized).abs().max().item()
    print(f"4-bit embedding model vs dequantized fp32: {gap:.2e} (tolerance 1e-5); vs the "
          f"unquantized model: {quantization_error:.2e}")  # fmt: skip
    torch.testing.assert_close(quantized, dequantized, rtol=0, atol=1e-5)
    assert quantization_error > 100 * max(gap, 1e-7)


def test_selective_loss_through_the_4bit_head_equals_the_plain_loss():
    """The chunked selective loss (head dequantized inside each chunk) gives the value and LoRA
    gradients of the plain path (full logits through the head module)."""
    torch.manual_seed(0)
    model, tok = load_tiny()
    model.config.use_cache = False
    model = apply_method(model, QLORA)
    data = samples(4)
    batch = collate_padded(data, tok.pad_token_id)
    results = []
    for objective in (SFTObjective(chunk_size=5), SFTObjective(selective=False)):
        model.zero_grad()
        loss = objective.loss_sum(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    assert SFTObjective()._can_select(model.get_base_model())
    (fast, fast_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert len(fast_grads) == 2 * len(TINY_LINEARS)
    for name, g in fast_grads.items():
        assert g.abs().max() > 0 or "lora_A" in name, name  # lora_B is 0 at start: A's grad is 0
        # rounding: the loss takes (softmax - one_hot) @ W as (e @ W) / sum(e) - W[target]
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-3, atol=1e-6)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reference = causal_lm_loss_sum(model(**inputs).logits, batch["labels"])
    torch.testing.assert_close(plain, reference.detach())


def test_one_step_gives_every_adapter_a_nonzero_gradient(tmp_path):
    """On the 4-bit embedding + head base, through the Trainer (selective loss, gradient
    checkpointing): every LoRA parameter has a non-zero gradient after one step."""
    grads, model = gradients_after_one_step(tmp_path, checkpointing=True, evaluate_first=True)
    assert isinstance(model.get_base_model().get_output_embeddings(), QuantizedHead)
    assert len(grads) == 2 * len(TINY_LINEARS)
    for name, g in grads.items():
        assert g is not None and g.abs().max() > 0, name


def test_runs_from_before_the_option_keep_full_precision_embeddings(tmp_path):
    """A qlora run whose config.yaml has no method.quantize_embeddings trained with fp32
    embeddings: it is reloaded that way (its adapter learned against those)."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "qlora", "r": 4}}))
    assert quantized_run_method(tmp_path).quantize_embeddings is False
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"method": {"name": "qlora", "quantize_embeddings": True}})
    )
    assert quantized_run_method(tmp_path).quantize_embeddings is True
    assert MethodConfig().quantize_embeddings is True  # new runs: on by default


@pytest.mark.slow
def test_built_in_model_base_is_under_0_6_bytes_per_parameter():
    """SmolLM2-135M with NF4 + double quant everywhere, embedding/head included: bytes of every
    tensor held (codes and constants) per parameter of the original model."""
    method = MethodConfig(name="qlora")
    model, _, _ = load_quantized_model("smollm2-135m-instruct", "float32", "cpu", method=method)
    fp = base_footprint(model)
    params = fp["linear_params"] + fp["other_params"]
    whole = (fp["linear_bytes"] + fp["other_bytes"]) / params
    print(f"built-in model, whole frozen base: {whole:.3f} bytes/param of {params:,}")
    assert 134_000_000 < params < 135_000_000
    assert whole <= 0.6
