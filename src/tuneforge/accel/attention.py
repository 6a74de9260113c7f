"""Variable-length attention for packed rows without flash-attn (CPU, or GPUs without it).

A packed row holds several samples. The plain way to keep them apart is a 4D block-diagonal mask,
but then SDPA computes every (query, key) pair of the row — a 512-token row of three samples does
about three times the attention work its samples need — and reads a (B, 1, T, T) mask on every
layer. ``varlen_sdpa`` instead runs causal SDPA on each sample's own slice, the CPU counterpart of
flash-attn's variable-length kernel: the same numbers (a test compares them), no mask, and
attention work proportional to the sum of squared sample lengths.

The sample boundaries arrive as ``cu_seq_lens_q`` (cumulative lengths over the flattened (B*T)
positions, the layout flash-attn uses), passed through the model's keyword arguments to every
attention layer. Without them (padded eval batches, generation) the function is plain SDPA with
the usual mask, so a model can keep this implementation for a whole training run.

Where the fused CPU kernels are built (``tuneforge.accel.kernels``), float32 CPU tensors take
``varlen_attention`` instead: one C++ call for all samples and heads, which stacks the query
heads sharing a KV head into one matrix and runs each 64-token block's scores as one BLAS
product over the causal part only (2.8x faster than a flash-attention call per sample, forward
and backward, for samples of 64-469 tokens). It gives SDPA's numbers up to float rounding (tests
compare values and gradients both ways).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from tuneforge.accel import kernels

VARLEN_SDPA = "tuneforge_varlen_sdpa"
_registered = False
_last_bounds: tuple[weakref.ref, list[int]] | None = None  # (the batch's cu_seq_lens_q, its list)


def varlen_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (B, H, T, D) query/key/value -> (B, T, H, D) output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[2] != key.shape[2]:  # no packing, or a cache (generation)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    B, H, T, D = query.shape
    same_dim = key.shape[-1] == value.shape[-1] == D  # (not models whose V heads differ)
    if dropout == 0.0 and same_dim and kernels.attention_usable(query, key, value):
        # (B, H, T, D) views of (B, T, H, D) projections: [B*T, heads, D], a view (a copy for
        # other layouts when B > 1)
        q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (query, key, value))
        out = _VarlenAttention.apply(q, k, v, cu, D**-0.5 if scaling is None else scaling)
        return out.view(B, T, H, D), None
    gqa = H != key.shape[1]
    bounds = _boundaries(cu)
    lengths: list[list[int]] = [[] for _ in range(B)]  # each row's segment lengths
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        lengths[start // T].append(end - start)
    # ``split`` views: backward joins the pieces' gradients with one ``cat``, where a slice
    # would cost a zero-filled full-size gradient per sample. SDPA's CPU output is laid out
    # (1, L, H, D) under its (1, H, L, D) shape, so the transposed pieces join into (1, T, H, D)
    # with one copy. The pieces stay 4D: the CPU flash kernel takes nothing else.

    def rows(t: torch.Tensor) -> list[torch.Tensor]:
        return [t] if B == 1 else [r.unsqueeze(0) for r in t.unbind(0)]

    out = []
    for q, k, v, lens in zip(rows(query), rows(key), rows(value), lengths, strict=True):
        pieces = [
            F.scaled_dot_product_attention(
                qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
            ).transpose(1, 2)
            for qs, ks, vs in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2), strict=True)
        ]
        out.append(pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return (out[0] if B == 1 else torch.cat(out)), None


def _boundaries(cu: torch.Tensor) -> list[int]:
    """``cu.tolist()``, read once per batch: every layer gets the same tensor, and on a GPU each
    ``tolist`` waits until the device has finished all queued work (a sync per layer, leaving the
    GPU idle while the next layer's kernels are launched)."""
    global _last_bounds
    if _last_bounds is not None and _last_bounds[0]() is cu:
        return _last_bounds[1]
    bounds = cu.tolist()
    _last_bounds = (weakref.ref(cu), bounds)
    return bounds


class _VarlenAttention(torch.autograd.Function):
    """Causal attention of each sample to itself, [tokens, heads, D] in and out (C++ kernel)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, scale: float):
        out, lse = torch.ops.tuneforge.varlen_attention_forward(q, k, v, cu, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = torch.ops.tuneforge.varlen_attention_backward(
            grad, q, k, v, out, lse, cu, ctx.scale
        )
        return dq, dk, dv, None, None


def register() -> str:
    """Make ``VARLEN_SDPA`` a transformers attention implementation (once); returns its name.

    Its mask function is SDPA's, so batches without ``cu_seq_lens_q`` get the usual mask.
    """
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)
        _registered = True
    return VARLEN_SDPA


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Sample boundaries of packed rows from their restarting position ids: cumulative lengths
    over the flattened (B*T) positions, int32, starting at 0 (a row's padding tail, whose
    positions also restart at 0, is one more segment)."""
    B, T = position_ids.shape
    starts = (position_ids == 0).nonzero()  # (n, 2): row, column, row-major
    flat = (starts[:, 0] * T + starts[:, 1]).tolist()
    return torch.tensor([*flat, B * T], dtype=torch.int32)
