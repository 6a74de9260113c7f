"""BitDropout: the LoRA dropout cut from bulk random bits (methods/fast_dropout.py)."""

import pytest
import torch

from tuneforge.config import MethodConfig
from tuneforge.methods import apply_method
from tuneforge.methods.fast_dropout import BitDropout, drop_threshold, keep_mask
from tuneforge.models import load_model


def test_drop_rate_and_scale_match_nn_dropout():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros of its own
    layer = BitDropout(0.05)
    out = layer(x)
    dropped = (out == 0).float().mean().item()
    # 1e6 draws: the binomial standard deviation is 2.2e-4
    assert abs(dropped - 0.05) < 1.5e-3
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / layer.keep)
    assert abs(layer.keep - 0.95) < 2e-5
    # unbiased like nn.Dropout: the mean is kept
    assert abs(out.mean().item() / x.mean().item() - 1) < 3e-3


def test_lanes_are_uniform_and_independent():
    torch.manual_seed(1)
    n = 400_000
    for p in (0.05, 0.1, 0.5):
        mask = keep_mask(torch.Size([n]), p, torch.device("cpu"))
        share = 1 - mask.float().mean().item()
        assert abs(share - drop_threshold(p) / 2**15) < 5 * (p * (1 - p) / n) ** 0.5
        # the four 15-bit numbers of one draw are independent: neighbours drop together at p^2
        quads = (~mask).view(-1, 4).float()
        both = (quads[:, 0] * quads[:, 3]).mean().item()
        assert abs(both - p * p) < 5 * (p * p / (n / 4)) ** 0.5


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = (torch.rand(64, 32) + 0.5).requires_grad_(True)
    layer = BitDropout(0.2)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    expected = g * (out != 0) / layer.keep
    torch.testing.assert_close(x.grad, expected)


def test_eval_mode_and_zero_probability_are_the_identity():
    x = torch.randn(8, 8)
    layer = BitDropout(0.3).eval()
    assert layer(x) is x
    assert BitDropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        BitDropout(1.0)


def test_same_seed_same_masks():
    x = torch.ones(256, 256)
    torch.manual_seed(3)
    a = BitDropout(0.1)(x)
    torch.manual_seed(3)
    b = BitDropout(0.1)(x)
    torch.manual_seed(4)
    c = BitDropout(0.1)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_lora_layers_get_bit_dropout(name):
    model, _, _ = load_model("tiny-llama", dtype="float32", device="cpu")
    model = apply_method(model, MethodConfig(name=name, r=4, lora_alpha=8, lora_dropout=0.1))
    layers = [m for m in model.modules() if isinstance(m, BitDropout)]
    assert layers and all(m.p == 0.1 for m in layers)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    # the adapter trains: dropout reaches the LoRA A gradients
    model.train()
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
