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


def test_selective_loss_scales_with_the_incoming_gradient_and_skips_work_without_grad():
    """The gradients are taken in forward: backward must still follow the outer gradient (a
    mean, a weight), a frozen head gets none, a callable (4-bit) head is called per chunk, and
    under no_grad the value is the same."""
    torch.manual_seed(1)
    B, T, C, V = 2, 9, 8, 30
    hidden = torch.randn(B, T, C, requires_grad=True)
    weight = torch.randn(V, C)
    labels = torch.randint(0, V, (B, T))
    labels[1, :3] = IGNORE
    plain = causal_lm_loss_sum(hidden @ weight.t(), labels)
    (gh,) = torch.autograd.grad(plain * 2.5, (hidden,))
    calls = []

    def head():
        calls.append(1)
        return weight

    sel = selective_lm_loss_sum(hidden, head, labels, chunk_size=5)
    assert len(calls) == 3  # 15 supervised positions, chunks of 5
    (sh,) = torch.autograd.grad(sel * 2.5, (hidden,))
    torch.testing.assert_close(sel, plain)
    torch.testing.assert_close(sh, gh)
    with torch.no_grad():
        torch.testing.assert_close(selective_lm_loss_sum(hidden, weight, labels), plain)
    none = torch.full((B, T), IGNORE)
    empty = selective_lm_loss_sum(hidden, weight, none)
    assert empty.item() == 0
    empty.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_plain_loss_against_hand_computed_value():
    """Two positions, vocab 2. logits [0, 0] -> CE = ln 2; [ln 3, 0] with target 0 -> ln(4/3)."""
    logits = torch.tensor([[[0.0, 0.0], [torch.log(torch.tensor(3.0)), 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE, 1, 0]])
    expected = torch.log(torch.tensor(2.0)) + torch.log(torch.tensor(4 / 3))
    torch.testing.assert_close(causal_lm_loss_sum(logits, labels), expected)
