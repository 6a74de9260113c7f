"""Per-sample causal SDPA for packed rows (tuneforge.accel.attention) gives the block-mask numbers."""

import contextlib

import pytest
import torch

from tuneforge.accel import attention
from tuneforge.accel.attention import VARLEN_SDPA, cu_seq_lens, register
from tuneforge.data.batching import collate_packed, collate_padded
from tuneforge.models import load_model
from tuneforge.train.sft import SFTObjective

from ..data.test_batching import make_samples


def test_cu_seq_lens_from_restarting_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    assert cu_seq_lens(pos).tolist() == [0, 3, 5, 6, 8, 12]


def _rows(samples):
    return [samples[:3], samples[3:5]]  # the second row is shorter: it ends in padding


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@torch.no_grad()
def test_varlen_logits_equal_the_mask_path_and_each_sample_alone(name, kernel_path):
    model, tok, _ = load_model(name)
    model.eval()
    samples = make_samples(5, seed=1)
    masked = collate_packed(_rows(samples), tok.pad_token_id)
    varlen = collate_packed(_rows(samples), tok.pad_token_id, varlen=True)
    varlen["cu_seq_lens_q"] = cu_seq_lens(varlen["position_ids"])
    ref = model(**masked).logits
    model.config._attn_implementation = register()
    try:
        out = model(**varlen).logits
        # without boundaries the implementation is plain SDPA (padded batches, generation)
        plain = model(input_ids=torch.tensor([samples[0].input_ids])).logits[0]
    finally:
        model.config._attn_implementation = "sdpa"
    for b in range(2):  # where the samples are (the padding tail attends differently)
        n = int((masked["input_ids"][b] != tok.pad_token_id).sum())
        torch.testing.assert_close(out[b, :n], ref[b, :n], atol=1e-5, rtol=1e-4)
    pos = 0
    for s in samples[:3]:
        alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
        torch.testing.assert_close(out[0, pos : pos + len(s)], alone, atol=1e-5, rtol=1e-4)
        pos += len(s)
    torch.testing.assert_close(
        plain, model(input_ids=torch.tensor([samples[0].input_ids])).logits[0]
    )


def test_varlen_loss_and_gradients_equal_the_mask_path(kernel_path):
    torch.manual_seed(0)
    model, tok, _ = load_model("tiny-llama")
    model.train()
    samples = make_samples(9, seed=2)
    rows = [samples[:5], samples[5:]]
    obj = SFTObjective()
    results = []
    for impl in ("sdpa", VARLEN_SDPA):
        batch = collate_packed(rows, tok.pad_token_id, varlen=impl != "sdpa")
        if impl != "sdpa":
            batch["cu_seq_lens_q"] = cu_seq_lens(batch["position_ids"])
            register()
        model.config._attn_implementation = impl
        model.zero_grad()
        loss = obj.loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    model.config._attn_implementation = "sdpa"
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-4)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-5)


def test_the_kernel_runs_only_where_it_applies(kernel_path, monkeypatch):
    """float32 CPU tensors without dropout or autocast take the kernel (when built); the others,
    and kernels.disabled(), run SDPA per sample, with the same output."""
    calls = []
    real = attention._VarlenAttention.apply
    monkeypatch.setattr(attention._VarlenAttention, "apply",
                        lambda *a: calls.append(1) or real(*a))  # fmt: skip
    torch.manual_seed(5)
    lens, T = [5, 11, 3], 19
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    q = torch.randn(1, T, 4, 16).transpose(1, 2)  # (B, H, T, D) views, as the model passes them
    k, v = (torch.randn(1, T, 2, 16).transpose(1, 2) for _ in "kv")
    module = torch.nn.Module()
    out, _ = attention.varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)
    # the kernel path: the C++ attention kernel, where PyTorch exports BLAS (MKL builds do)
    kernel = kernel_path == "kernels" and torch.ops.tuneforge.has_blas()
    assert out.shape == (1, T, 4, 16) and len(calls) == kernel
    ref = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, enable_gqa=True).transpose(1, 2)
        for qs, ks, vs in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2), strict=True)
    ], dim=1)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    before = len(calls)
    attention.varlen_sdpa(module, q.double(), k.double(), v.double(), None, cu_seq_lens_q=cu)
    attention.varlen_sdpa(module, q, k, v, None, dropout=0.1, cu_seq_lens_q=cu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention.varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)
    # value heads of another size than the query's (some models): SDPA per sample handles them
    v8 = torch.randn(1, T, 2, 8).transpose(1, 2)
    out8, _ = attention.varlen_sdpa(module, q, k, v8, None, cu_seq_lens_q=cu)
    assert out8.shape == (1, T, 4, 8)
    assert len(calls) == before


def test_trainer_picks_the_per_sample_path_for_packed_rows_and_sft_batches(tmp_path):
    """Packed rows and SFT micro-batches (the default collate) under SDPA take per-sample
    attention, one row without padding or mask; a custom collate (preference pairs) and eager
    attention keep padded batches."""
    from tuneforge.config import TrainingConfig
    from tuneforge.train.loop import Trainer

    model, tok, _ = load_model("tiny-llama")
    samples = make_samples(8)
    t = TrainingConfig(max_steps=1, batch_size=3, progress=False)
    args = (SFTObjective(), samples, [], t, tmp_path, tok.pad_token_id, torch.device("cpu"))
    packed = Trainer(model, *args, packing=True, max_length=128)
    assert packed.plan.varlen_sdpa
    assert "cu_seq_lens_q" in packed.make_batch(packed.window(0)[0])
    assert "attention_mask" not in packed.make_batch(packed.window(0)[0])
    unpacked = Trainer(model, *args)
    assert unpacked.plan.varlen_sdpa and unpacked.plan.unpadded
    spec = unpacked.window(0)[0]
    batch = unpacked.make_batch(spec)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (
        1, sum(len(samples[i]) for i in spec))  # fmt: skip
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    custom = Trainer(model, *args, collate=lambda s: collate_padded(s, tok.pad_token_id))
    assert not custom.plan.varlen_sdpa and "attention_mask" in custom.make_batch(spec)
    model.config._attn_implementation = "eager"
    try:
        assert not Trainer(model, *args).plan.varlen_sdpa
    finally:
        model.config._attn_implementation = "sdpa"


def test_unpadded_sft_batches_give_the_padded_loss_and_gradients(tmp_path, kernel_path):
    """The same micro-batch, padded with a mask (the plain path) and joined into one row through
    per-sample attention (what the trainer does without packing): same loss and gradients."""
    from tuneforge.config import MethodConfig, TrainingConfig
    from tuneforge.methods import apply_method
    from tuneforge.train.loop import Trainer

    torch.manual_seed(3)
    model, tok, _ = load_model("tiny-llama")
    model = apply_method(model, MethodConfig(name="lora", r=4, lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # LoRA's gradients reach A too
    model.train()
    samples = make_samples(6, seed=4)
    t = TrainingConfig(max_steps=1, batch_size=6, progress=False)
    args = (SFTObjective(), samples, [], t, tmp_path, tok.pad_token_id, torch.device("cpu"))
    trainer = Trainer(model, *args)
    spec = trainer.window(0)[0]
    padded = collate_padded([samples[i] for i in spec], tok.pad_token_id)
    assert padded["attention_mask"].sum() < padded["attention_mask"].numel()  # some padding
    results = []
    for batch, context in ((padded, contextlib.nullcontext()), (None, trainer.running())):
        model.zero_grad()
        with context:
            loss = SFTObjective().loss_sum(model, batch or trainer.make_batch(spec))
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-4)
    assert all(g.abs().sum() > 0 for g in g1.values())
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-5)


def test_varlen_micro_batches_are_one_row_without_padding(tmp_path):
    """With per-sample attention a micro-batch's rows are joined into one row: no padding to
    compute, and (flash-attn) transformers finds the samples from the position ids only when
    the batch has one row. flash-attn itself needs a GPU; the batch it would get is checked."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    from tuneforge.config import TrainingConfig
    from tuneforge.train.loop import Trainer

    model, tok, _ = load_model("tiny-llama")
    samples = make_samples(8)
    t = TrainingConfig(max_steps=1, batch_size=2, progress=False)
    args = (SFTObjective(), samples, [], t, tmp_path, tok.pad_token_id, torch.device("cpu"))
    for attn in ("sdpa", "flash_attention_2"):
        model.config._attn_implementation = attn
        try:
            trainer = Trainer(model, *args, packing=True, max_length=64)
        finally:
            model.config._attn_implementation = "sdpa"
        spec = trainer.window(0)[0]
        assert len(spec) == 2  # two packed rows...
        batch = trainer.make_batch(spec)
        # ...become one row holding every sample once, nothing else
        members = [samples[i] for row in spec for i in row]
        assert batch["input_ids"].shape == (1, sum(len(s) for s in members))
        assert batch["input_ids"][0].tolist() == [t for s in members for t in s.input_ids]
        assert _is_packed_sequence(batch["position_ids"], 1)
        assert ("cu_seq_lens_q" in batch) == (attn == "sdpa")
    # two rows would not be split by transformers' flash path: the samples would see each other
    two = collate_packed([samples[:3], samples[3:6]], tok.pad_token_id, varlen=True)
    assert not _is_packed_sequence(two["position_ids"], 2)


def test_stepping_by_hand_inside_running_is_what_run_trains(tmp_path):
    """``Trainer.running()`` is the context ``run`` trains in: per-sample attention and fused
    ops while it lasts (no layer keeps a [T x T] mask), the plain model after it. A bench that
    called ``train_step`` outside it measured the whole-row mask path instead."""
    from transformers.models.llama import modeling_llama

    from tuneforge.config import TrainingConfig
    from tuneforge.train.loop import Trainer

    model, tok, _ = load_model("tiny-llama")
    samples = make_samples(8)
    t = TrainingConfig(max_steps=2, batch_size=2, progress=False)
    args = (SFTObjective(), samples, [], t, tmp_path, tok.pad_token_id, torch.device("cpu"))
    trainer = Trainer(model, *args, packing=True, max_length=64)
    plain_norm = modeling_llama.LlamaRMSNorm.forward

    def square_saved(step: int) -> list[tuple]:
        rows = trainer.make_batch(trainer.window(step)[0])["input_ids"].shape[-1]
        assert rows != model.config.hidden_size
        shapes = []

        def pack(x):
            if x.dim() >= 2 and tuple(x.shape[-2:]) == (rows, rows):
                shapes.append(tuple(x.shape))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            trainer.accumulate_gradients(step)
        return shapes

    assert square_saved(0)  # outside: the whole-row mask path, a [T x T] mask per layer
    with trainer.running():
        assert model.config._attn_implementation == VARLEN_SDPA
        assert modeling_llama.LlamaRMSNorm.forward is not plain_norm
        assert square_saved(1) == []
    assert model.config._attn_implementation == "sdpa"
    assert modeling_llama.LlamaRMSNorm.forward is plain_norm
