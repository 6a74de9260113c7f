"""The selective, chunked loss gives the plain loss and gradients."""

import torch

from tuneforge.losses import IGNORE, causal_lm_loss_sum, selective_lm_loss_sum


def test_selective_chunked_loss_matches_plain_loss_and_gradients():
    torch.manual_seed(0)
    B, T, C, V = 3, 11, 16, 50
    hidden = torch.randn(B, T, C, requires_grad=True)
    weight = torch.randn(V, C, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :5] = IGNORE
    labels[2, 7:] = IGNORE
    plain = causal_lm_loss_sum(hidden @ weight.t(), labels)
    gh, gw = torch.autograd.grad(plain, (hidden, weight))
    sel = selective_lm_loss_sum(hidden, weight, labels, chunk_size=4)
    sh, sw = torch.autograd.grad(sel, (hidden, weight))
    torch.testing.assert_close(sel, plain)
    torch.testing.assert_close(sh, gh)
    torch.testing.assert_close(sw, gw)


def test_plain_loss_against_hand_computed_value():
    """Two positions, vocab 2. logits [0, 0] -> CE = ln 2; [ln 3, 0] with target 0 -> ln(4/3)."""
    logits = torch.tensor([[[0.0, 0.0], [torch.log(torch.tensor(3.0)), 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE, 1, 0]])
    expected = torch.log(torch.tensor(2.0)) + torch.log(torch.tensor(4 / 3))
    torch.testing.assert_close(causal_lm_loss_sum(logits, labels), expected)
