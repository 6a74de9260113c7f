"""LoRA dropout drawn as a sparse set of positions instead of a full mask (CPU).

peft puts an ``nn.Dropout`` in front of every LoRA A matrix. On a CPU its mask comes from
``bernoulli_``, one random draw per element, and is applied (and kept for backward) as a full
float tensor: on the built-in model that was 8% of a LoRA training step, more than the
576 x 576 matmul the mask feeds. Dropping each element independently with probability ``p`` is
a Bernoulli process, and the gaps between successive drops of a Bernoulli process are
geometric(p): so ``drop_indices`` draws about ``p * n`` geometric gaps (by inversion of
uniform draws) and sums them into the sorted flat positions of the dropped elements. That is the same
distribution as ``nn.Dropout``'s mask (exactly ``p``, independently per element) for a
twentieth of the random draws at ``p = 0.05``; applying it is a copy and a scattered zeroing
of those positions (one pass with the fused CPU kernels, ``tuneforge.accel.kernels``), and backward
keeps the ``int64`` positions (``8p`` bytes per element) instead of a mask. Kept values are scaled by ``1 / (1 - p)``, so the layer is
unbiased, as ``nn.Dropout`` is. The gaps come from torch's default generator, so a seed (and a
resumed RNG state) gives the same drops.

The fused LoRA layer (``tuneforge/accel/fused.py``) draws the same positions but keeps only the
input (which q, k and v share) and the positions for backward, where it rebuilds the dropped
copy. On other devices than the CPU ``SparseDropout`` is ``F.dropout`` (one fused kernel
there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tuneforge.accel import kernels

# gaps drawn per round: the expected count plus this many standard deviations and a constant,
# so that a second round is rare
MARGIN_SIGMAS = 6.0
MARGIN_EXTRA = 16


def drop_indices(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """Sorted flat positions in ``[0, numel)``, each present independently with probability
    ``p``: the partial sums of geometric(p) gaps (number of trials up to the next drop)."""
    if numel == 0 or p == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    chunks: list[torch.Tensor] = []
    log_q = math.log1p(-p)
    start = 0.0  # the next position a gap counts from
    while True:
        expected = (numel - start) * p
        n = max(1, int(expected + MARGIN_SIGMAS * math.sqrt(expected) + MARGIN_EXTRA))
        # geometric(p) by inversion, floor(log(u) / log(1 - p)) + 1 with u uniform in (0, 1]:
        # ``geometric_`` computes the same, element by element, at twice the time
        u = torch.rand(n, dtype=torch.float64, device=device).neg_().add_(1)
        gaps = u.log_().div_(log_q).floor_().add_(1)
        positions = gaps.cumsum_(0).add_(start - 1)  # float64: exact integers below 2**53
        last = positions[-1].item()
        if last >= numel:  # sorted: keep those below numel by slicing (no boolean mask)
            chunks.append(positions[: int(torch.searchsorted(positions, float(numel)))])
            break
        chunks.append(positions)
        start = last + 1
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return out.to(torch.int64)


def zero_at_(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Set the elements of contiguous ``x`` at flat (sorted) ``indices`` to 0, in place;
    returns ``x``."""
    if kernels.usable(x):
        return torch.ops.tuneforge.zero_at_(x, indices)
    x.view(-1).index_put_((indices,), torch.zeros((), dtype=x.dtype, device=x.device))
    return x


def zero_at(x: torch.Tensor, indices: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A contiguous copy of ``x * scale`` with the elements at flat (sorted) ``indices`` set to
    0 (one pass with the fused CPU kernels)."""
    out = x.contiguous()
    if kernels.usable(out):
        return torch.ops.tuneforge.zero_at(out, indices, scale)
    return zero_at_(out.clone() if scale == 1 else out * scale, indices)


class _DropScale(torch.autograd.Function):
    """``x * scale`` with the elements at ``indices`` zeroed; backward keeps only the indices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.scale = scale
        return zero_at(x, indices, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (indices,) = ctx.saved_tensors
        return zero_at(grad, indices, ctx.scale), None, None


def drop_scale(x: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """``x * scale`` with the elements at flat ``indices`` set to 0 (differentiable in ``x``)."""
    return _DropScale.apply(x, indices, scale)


class SparseDropout(torch.nn.Module):
    """Drop-in for ``nn.Dropout(p)`` (training: zero elements, scale the rest; eval: identity)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.keep = 1 - p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return drop_scale(x, drop_indices(x.numel(), self.p, x.device), 1 / self.keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Replace the ``nn.Dropout`` in front of each LoRA A matrix (peft's ``lora_dropout``) with
    ``SparseDropout`` of the same probability; returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is torch.nn.Dropout:
                dropouts[name] = SparseDropout(layer.p)
                replaced += 1
    return replaced
