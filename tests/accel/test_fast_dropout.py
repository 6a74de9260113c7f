"""SparseDropout: LoRA dropout drawn as geometric gaps between dropped positions
(accel/fast_dropout.py)."""

import pytest
import torch

from tuneforge.accel import fast_dropout
from tuneforge.accel.fast_dropout import SparseDropout, drop_indices, drop_scale
from tuneforge.config import MethodConfig
from tuneforge.methods import apply_method
from tuneforge.models import load_model

CPU = torch.device("cpu")


def test_drop_rate_and_scale_match_nn_dropout():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros of its own
    layer = SparseDropout(0.05)
    out = layer(x)
    dropped = (out == 0).float().mean().item()
    # 1e6 draws: the binomial standard deviation is 2.2e-4
    assert abs(dropped - 0.05) < 1.5e-3
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.95)
    # unbiased like nn.Dropout: the mean is kept
    assert abs(out.mean().item() / x.mean().item() - 1) < 3e-3


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_positions_are_a_bernoulli_process(p):
    """Sorted, distinct, in range; the rate is p everywhere (start, middle, end), and
    neighbours drop together at p^2 (independence)."""
    torch.manual_seed(1)
    n = 400_000
    idx = drop_indices(n, p, CPU)
    assert idx.dtype == torch.int64
    assert bool((idx[1:] > idx[:-1]).all()) and idx[0] >= 0 and idx[-1] < n
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    for part in mask.view(4, -1):  # each quarter at rate p
        m = part.numel()
        assert abs(part.float().mean().item() - p) < 5 * (p * (1 - p) / m) ** 0.5
    both = (mask[:-1] & mask[1:]).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p / n) ** 0.5


def test_small_tensors_follow_the_binomial(monkeypatch):
    """Counts over many 10-element draws have the binomial mean and variance, also when every
    draw needs several rounds of gaps (no safety margin)."""
    for sigmas, extra in ((6.0, 16), (0.0, 0)):
        monkeypatch.setattr(fast_dropout, "MARGIN_SIGMAS", sigmas)
        monkeypatch.setattr(fast_dropout, "MARGIN_EXTRA", extra)
        torch.manual_seed(2)
        p, n, draws = 0.3, 10, 3000
        counts = torch.zeros(n)
        totals = []
        for _ in range(draws):
            idx = drop_indices(n, p, CPU)
            assert idx.unique().numel() == idx.numel() and (idx < n).all()
            counts[idx] += 1
            totals.append(idx.numel())
        t = torch.tensor(totals, dtype=torch.float64)
        assert abs(t.mean().item() - n * p) < 5 * (n * p * (1 - p) / draws) ** 0.5
        assert abs(t.var().item() / (n * p * (1 - p)) - 1) < 0.15
        assert ((counts / draws - p).abs() < 5 * (p * (1 - p) / draws) ** 0.5).all()


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = (torch.rand(64, 32) + 0.5).requires_grad_(True)
    layer = SparseDropout(0.2)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    expected = g * (out != 0) / 0.8
    torch.testing.assert_close(x.grad, expected)


def test_drop_scale_takes_non_contiguous_input():
    x = torch.arange(12.0).view(3, 4).t()  # non-contiguous
    out = drop_scale(x, torch.tensor([0, 5]), 2.0)
    expected = (x * 2).contiguous()
    expected.view(-1)[[0, 5]] = 0
    assert torch.equal(out, expected)
    assert torch.equal(x, torch.arange(12.0).view(3, 4).t())  # input untouched


def test_eval_mode_and_zero_probability_are_the_identity():
    x = torch.randn(8, 8)
    layer = SparseDropout(0.3).eval()
    assert layer(x) is x
    assert SparseDropout(0.0).train()(x) is x
    assert drop_indices(100, 0.0, CPU).numel() == 0
    with pytest.raises(ValueError):
        SparseDropout(1.0)


def test_same_seed_same_drops():
    x = torch.ones(256, 256)
    torch.manual_seed(3)
    a = SparseDropout(0.1)(x)
    torch.manual_seed(3)
    b = SparseDropout(0.1)(x)
    torch.manual_seed(4)
    c = SparseDropout(0.1)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_lora_layers_get_sparse_dropout(name):
    model, _, _ = load_model("tiny-llama", dtype="float32", device="cpu")
    model = apply_method(model, MethodConfig(name=name, r=4, lora_alpha=8, lora_dropout=0.1))
    layers = [m for m in model.modules() if isinstance(m, SparseDropout)]
    assert layers and all(m.p == 0.1 for m in layers)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    # the adapter trains: dropout reaches the LoRA A gradients
    model.train()
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
