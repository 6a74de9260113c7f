"""On a GPU the CPU kernels and the CPU-only tricks step aside and the fused ops give the plain
numbers. No GPU here: ``FakeCuda`` tensors say they are on ``cuda`` (every ``x.device`` check
sees a GPU) while their arithmetic runs on the CPU, so the GPU branches run and can be compared
with the plain code."""

import pytest
import torch
import torch.nn.functional as F

from tuneforge.accel import attention, fast_dropout, fused, kernels
from tuneforge.accel.fast_dropout import SparseDropout


class FakeCuda(torch.Tensor):
    @property
    def device(self):
        return torch.device("cuda")


def fake(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(FakeCuda)


def plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


@pytest.fixture
def kernels_off_limits(monkeypatch, kernel_path):
    """The kernels loaded (or switched off), and any attempt to consult them an error."""

    def consulted():
        raise AssertionError("the CPU kernels were consulted for a GPU tensor")

    monkeypatch.setattr(kernels, "available", consulted)


def test_the_kernels_refuse_gpu_tensors_without_loading(kernels_off_limits):
    x = fake(torch.randn(4, 8))
    assert not kernels.usable(x)
    assert not kernels.usable(torch.randn(4, 8), x)  # one GPU tensor among CPU ones
    q = fake(torch.randn(1, 2, 5, 8))
    assert not kernels.attention_usable(q, q, q)


def test_fused_norm_rotary_and_swiglu_give_the_plain_numbers_on_a_gpu(kernels_off_limits):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    cos, sin = torch.randn(5, 16), torch.randn(5, 16)
    gate, up = torch.randn(3, 40, requires_grad=True), torch.randn(3, 40, requires_grad=True)

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def rope(x):
        h = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin

    cases = [
        (lambda x, w: fused.rms_norm(x, w, 1e-6), rms, (x, w)),
        (lambda x: fused.rotary(x, cos, sin), rope, (x,)),
        (fused.swiglu, lambda g, u: F.silu(g) * u, (gate, up)),
    ]
    for fast, ref, inputs in cases:
        out = fast(*(fake(t) for t in inputs))
        assert out.device.type == "cuda"  # ran on the "GPU" tensors
        grads = torch.autograd.grad(out.sum(), inputs)
        want = ref(*inputs)
        torch.testing.assert_close(plain(out), want)
        for g, w_ in zip(grads, torch.autograd.grad(want.sum(), inputs), strict=True):
            torch.testing.assert_close(plain(g), w_)


@pytest.mark.parametrize("training", [True, False])
def test_the_fused_lora_layer_gives_peft_numbers_on_a_gpu(
    kernels_off_limits, monkeypatch, training
):
    """With dropout in training, the GPU path draws ``F.dropout``'s mask (never the CPU's sparse
    positions), so with the same seed it equals peft's layer exactly."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    def no_positions(*args):
        raise AssertionError("sparse dropout positions drawn for a GPU tensor")

    monkeypatch.setattr(fast_dropout, "drop_indices", no_positions)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(16, 24)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["proj"])
    layer = inject_adapter_in_model(config, holder).proj
    fast_dropout.use_fast_dropout(holder)
    assert type(layer.lora_dropout["default"]) is SparseDropout
    layer.base_layer.requires_grad_(False)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    layer.train(training)
    x = fake(torch.randn(2, 6, 16))
    outs = []
    for forward in (LoraLinear.forward, fused._lora_forward(LoraLinear.forward)):
        torch.manual_seed(1)
        outs.append(plain(forward(layer, x)))
    torch.testing.assert_close(outs[1], outs[0])


def test_sparse_dropout_is_f_dropout_on_a_gpu(monkeypatch):
    monkeypatch.setattr(fast_dropout, "drop_indices", lambda *a: 1 / 0)
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    got = SparseDropout(0.25).train()(fake(x))
    torch.manual_seed(3)
    torch.testing.assert_close(plain(got), F.dropout(x, 0.25, training=True))


class CountingList(torch.Tensor):
    calls = 0

    def tolist(self):
        CountingList.calls += 1
        return super().tolist()


def test_packed_attention_reads_the_sample_boundaries_once_per_batch(kernels_off_limits):
    """On a GPU ``cu_seq_lens_q`` lives on the device, and reading it waits for the device: once
    per batch, not once per layer."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    q, k, v = (fake(torch.randn(1, 4, 9, 8)) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32).as_subclass(CountingList)
    CountingList.calls = 0
    first, _ = attention.varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)
    second, _ = attention.varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)  # next layer
    assert CountingList.calls == 1
    torch.testing.assert_close(plain(first), plain(second))
    # each sample attends to itself only: the first sample's output is its own attention
    alone = F.scaled_dot_product_attention(*(plain(t)[:, :, :4] for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(plain(first)[:, :4], alone.transpose(1, 2))
    other = torch.tensor([0, 2, 9], dtype=torch.int32).as_subclass(CountingList)  # next batch
    attention.varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=other)
    assert CountingList.calls == 2
