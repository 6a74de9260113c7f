"""Fused autograd functions for the memory-bound parts of a Llama-family training step.

On a CPU a LoRA step of the built-in model spends about half its time outside matrix
multiplies, in element-wise passes over activations that autograd records one by one: RMSNorm
is five of them forward (cast, pow, mean, rsqrt, two multiplies) and more backward; the rotary
embedding slices, negates and concatenates ``q`` and ``k`` (``rotate_half``), and every slice
costs a zero-filled full-size gradient in backward; peft's LoRA layer multiplies the whole
``[tokens x out]`` LoRA output by its scaling and adds it in a separate pass. The functions here
compute the same values with fewer passes and hand-written backward passes:

- ``rms_norm``: saves the input and one ``rstd`` per token; backward is four passes.
- ``rotary``: ``x * cos`` plus two in-place ``addcmul_`` on the halves; backward likewise.
- ``swiglu``: the gated MLP's ``silu(gate) * up`` keeps gate and up, not also ``silu(gate)``
  (recomputed in backward: one more pass, a third less MLP activation memory).
- LoRA: the scaling (and dropout's ``1 / keep``) multiplies the ``[tokens x r]`` A output, the
  B product is added into the base output by ``addmm_``; with ``SparseDropout`` the layer
  keeps its input and the dropped positions, not a dropped copy (q, k and v share the input).

Where the fused CPU kernels are built (``tuneforge.accel.kernels``), SwiGLU and RMSNorm each run as
one pass over memory, and the LoRA layer's A products subtract the dropped elements' terms
instead of multiplying a dropped copy of the input. They give the plain path's numbers up to float
rounding (tests compare values and gradients, with and without the kernels).
``fused_ops(model)`` switches them on for one model family for the length of a ``with`` block
(the trainer holds it for a run; ``training.fused_ops: false`` keeps the plain path). Models
outside ``FAMILIES``, other dtypes than float32 for RMSNorm, DoRA, several active adapters,
merged or disabled adapters and LoRA layers over quantized bases keep their own code.

The fused functions replace model code by name, so each replacement is checked by behaviour
first (``matches``): the fused function and the code it would replace run on small random
inputs and must give the same numbers. Comparing behaviour, not source text, survives wrappers
such as transformers' kernelized ``Func`` objects (``kernels`` installed); code that changed
upstream fails the check, keeps running as the model wrote it, and gets one warning line.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from tuneforge.accel import kernels
from tuneforge.accel.fast_dropout import zero_at, zero_at_

# model_type -> the transformers modeling module, its RMSNorm and its MLP class, whose code is
# Llama's (weight * x * rsqrt(mean(x^2) + eps); rotate_half over the two halves of head_dim;
# down(act(gate(x)) * up(x))); ``matches`` checks that by behaviour before each replacement
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaMLP"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "MistralMLP"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", "Qwen3MLP"),
}


# -- RMSNorm ---------------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if kernels.usable(x, weight):
            out, rstd = torch.ops.tuneforge.rms_norm_forward(x, weight, eps)
        else:
            rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
            out = (x * rstd).mul_(weight)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        # d/dx of x * rstd: rstd * (gw - x * rstd^2 * mean(gw * x)), gw = grad * weight
        if kernels.usable(grad, x, weight, rstd):
            dx = torch.ops.tuneforge.rms_norm_backward(grad, x, weight, rstd)
        else:
            gw = grad * weight
            dot = torch.linalg.vecdot(gw, x).unsqueeze(-1).mul_(rstd.pow(2) / x.shape[-1])
            dx = gw.addcmul_(x, dot, value=-1).mul_(rstd)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (grad * x).mul_(rstd).reshape(-1, x.shape[-1]).sum(0)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension."""
    return _RMSNorm.apply(x, weight, eps)


def _rms_norm_forward(plain):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return plain(self, hidden_states)  # the plain path computes in float32 and casts
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    return forward


# -- rotary embedding --------------------------------------------------------------------------
class _Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) over the halves."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        dx = grad * cos
        dx[..., :h].addcmul_(grad[..., h:], sin[..., h:])
        dx[..., h:].addcmul_(grad[..., :h], sin[..., :h], value=-1)
        return dx, None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding of ``x`` (``cos``/``sin`` broadcast against it)."""
    return _Rotary.apply(x, cos, sin)


def _apply_rotary_pos_emb(plain):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if cos.shape[-1] != q.shape[-1] or q.shape[-1] % 2:  # partial rotary: not this layout
            return plain(q, k, cos, sin, unsqueeze_dim)
        cos = cos.unsqueeze(unsqueeze_dim)
        sin = sin.unsqueeze(unsqueeze_dim)
        return rotary(q, cos, sin), rotary(k, cos, sin)

    return apply_rotary_pos_emb


# -- SwiGLU -------------------------------------------------------------------------------------
class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only: silu(gate) is recomputed in backward, where
    autograd would keep it as a third [tokens x intermediate] tensor."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        if kernels.usable(gate, up) and gate.shape == up.shape:
            return torch.ops.tuneforge.swiglu_forward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if kernels.usable(grad, gate, up) and grad.shape == gate.shape == up.shape:
            d_gate, d_up = torch.ops.tuneforge.swiglu_backward(grad, gate, up)
            return d_gate, d_up if ctx.needs_input_grad[1] else None
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the gated MLP's activation."""
    return _SwiGLU.apply(gate, up)


def _mlp_forward(plain):
    from transformers.activations import SiLUActivation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.act_fn) not in (SiLUActivation, torch.nn.SiLU):
            return plain(self, x)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    return forward


# -- LoRA -----------------------------------------------------------------------------------------
class _LoraLinear(torch.autograd.Function):
    """A frozen ``nn.Linear`` and its LoRA branch in one node:
    ``x @ W.T + bias + (zero_at(x, indices) @ A.T) * scale @ B.T``.

    Forward keeps ``x`` (q, k and v share it, so their three layers keep one tensor where the
    dropped copies were three) and the ``[tokens x r]`` product, not a dropped copy; backward
    rebuilds the dropped input for A's gradient and accumulates the input gradient of both
    branches into one tensor (``addmm_``), where autograd would add two ``[tokens x in]``
    gradients in a separate pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, indices, scale: float):
        out = F.linear(x, weight, bias)
        # the fused CPU kernels subtract the dropped elements' terms from x @ A.T (5% of x at
        # p = 0.05) instead of multiplying a dropped copy of x
        sparse = indices is not None and kernels.usable(x, a)
        if indices is None or sparse:
            h = x.matmul(a.t())  # [tokens, r]
            if sparse:
                torch.ops.tuneforge.lora_drop_product_(h, x, a, indices)
        else:
            h = zero_at(x, indices).matmul(a.t())
        h.mul_(scale)
        out.addmm_(h, b.t())
        ctx.save_for_backward(x, weight, a, b, h, indices)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, a, b, h, indices = ctx.saved_tensors
        d_h = grad.matmul(b).mul_(ctx.scale)  # [tokens, r]
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = d_h.matmul(a)
            if indices is not None:
                zero_at_(dx, indices)
            dx.addmm_(grad, weight)
        if ctx.needs_input_grad[3]:
            if indices is None:
                da = d_h.t().matmul(x)
            elif kernels.usable(x, d_h):
                da = torch.ops.tuneforge.lora_drop_grad_(d_h.t().matmul(x), d_h, x, indices)
            else:
                da = d_h.t().matmul(zero_at(x, indices))
        if ctx.needs_input_grad[4]:
            db = grad.t().matmul(h)
        return dx, None, None, da, db, None, None


def _lora_forward(plain):
    from tuneforge.accel.fast_dropout import SparseDropout, drop_indices

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or args or kwargs:
            return plain(self, x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return plain(self, x, *args, **kwargs)
        name = active[0]
        base, a, b = self.base_layer, self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        if (
            name in getattr(self, "lora_variant", {})  # DoRA and other variants
            or self.use_dora.get(name, False)
            or type(base) is not torch.nn.Linear
            or b.bias is not None
            or not x.dtype == base.weight.dtype == a.weight.dtype
            or torch.is_autocast_enabled(x.device.type)  # addmm_ would mix dtypes
            or type(dropout) not in (torch.nn.Identity, torch.nn.Dropout, SparseDropout)
        ):
            return plain(self, x, *args, **kwargs)
        scale = self.scaling[name]
        x2 = x.reshape(-1, x.shape[-1])  # 2D throughout: addmm_ on a view would cost a copy
        trains = base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
        plain_input = type(dropout) is torch.nn.Identity or not dropout.training or dropout.p == 0
        sparse = type(dropout) is SparseDropout and x.device.type == "cpu"
        if trains or not (plain_input or sparse):  # a trainable base, nn.Dropout, a GPU
            out = F.linear(x2, base.weight, base.bias)
            h = F.linear(x2 if plain_input else dropout(x2), a.weight).mul_(scale)  # [tokens, r]
            return out.addmm_(h, b.weight.t()).view(*x.shape[:-1], out.shape[-1])
        indices = None
        if not plain_input:
            indices = drop_indices(x2.numel(), dropout.p, x.device)
            scale = scale / dropout.keep  # dropout's 1 / keep, on the [tokens x r] product
        out = _LoraLinear.apply(
            x2.contiguous(), base.weight, base.bias, a.weight, b.weight, indices, scale
        )
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


# -- checking what they replace --------------------------------------------------------------------
_checked: dict[tuple[str, object], bool] = {}  # (piece, the code it would replace) -> same numbers
_warned: set[tuple[str, ...]] = set()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))


def _norm_matches(norm_cls: type, plain) -> bool:
    norm = norm_cls(24, eps=1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    x = torch.randn(3, 5, 24) * 3
    return _same(plain(norm, x), _rms_norm_forward(plain)(norm, x))


def _rotary_matches(plain) -> bool:
    B, H, Hkv, T, D = 2, 4, 2, 5, 8
    q, k = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D)
    angles = torch.randint(0, 64, (B, T, 1)) * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))
    emb = torch.cat([angles, angles], -1)  # (B, T, D), as the models' rotary embedding makes it
    want = plain(q, k, emb.cos(), emb.sin())
    got = _apply_rotary_pos_emb(plain)(q, k, emb.cos(), emb.sin())
    return len(want) == 2 and all(_same(w, g) for w, g in zip(want, got, strict=True))


def _mlp_matches(mlp_cls: type, plain, config) -> bool:
    config = copy.copy(config)  # the model's own settings (activation, bias), small shapes
    config.hidden_size, config.intermediate_size = 16, 40
    mlp = mlp_cls(config)
    x = torch.randn(2, 3, 16)
    return _same(plain(mlp, x), _mlp_forward(plain)(mlp, x))


def _lora_matches(lora_cls: type, plain) -> bool:
    from peft import LoraConfig, inject_adapter_in_model

    for dropout in (0.0, 0.1):  # without dropout, and with it (eval: nothing dropped)
        holder = torch.nn.Module()
        holder.proj = torch.nn.Linear(16, 24)
        config = LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["proj"])
        layer = inject_adapter_in_model(config, holder).proj
        if not isinstance(layer, lora_cls):
            return False
        layer.base_layer.requires_grad_(False)
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        layer.eval()
        x = torch.randn(3, 16)
        if not _same(plain(layer, x), _lora_forward(plain)(layer, x)):
            return False
    return True


def matches(piece: str, plain, check) -> bool:
    """Whether the fused ``piece`` gives the numbers of ``plain``, the code it would replace
    (``check()`` compares them on small random inputs); once per piece and code in a process.
    The global random state is left as it was, and an error in the check counts as a mismatch."""
    key = (piece, plain)
    if key not in _checked:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            try:
                _checked[key] = bool(check())
            except Exception:  # the code changed shape: its signature, its attributes
                _checked[key] = False
    return _checked[key]


# -- switching them on ------------------------------------------------------------------------
def family_module(model: torch.nn.Module):
    """The modeling module whose functions ``fused_ops`` replaces, or None for other models."""
    config = getattr(model, "config", None)
    entry = FAMILIES.get(getattr(config, "model_type", None))
    if entry is None:
        return None
    module = sys.modules.get(entry[0])
    if module is None or not all(hasattr(module, n) for n in (*entry[1:], "apply_rotary_pos_emb")):
        return None
    return module


def replacements(module, model_type: str, config) -> list[tuple[str, object, str, object, bool]]:
    """``(piece, owner, attribute, fused replacement, matches)`` for one family: what
    ``fused_ops`` would set, and whether the behaviour check passed for it."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    _, norm_name, mlp_name = FAMILIES[model_type]
    norm, mlp = getattr(module, norm_name), getattr(module, mlp_name)
    rope, lora = module.apply_rotary_pos_emb, LoraLinear.forward
    return [
        ("RMSNorm", norm, "forward", _rms_norm_forward(norm.forward),
         matches("RMSNorm", norm.forward, lambda: _norm_matches(norm, norm.forward))),
        ("MLP", mlp, "forward", _mlp_forward(mlp.forward),
         matches("MLP", mlp.forward, lambda: _mlp_matches(mlp, mlp.forward, config))),
        ("rotary embedding", module, "apply_rotary_pos_emb", _apply_rotary_pos_emb(rope),
         matches("rotary embedding", rope, lambda: _rotary_matches(rope))),
        ("LoRA layer", LoraLinear, "forward", _lora_forward(lora),
         matches("LoRA layer", lora, lambda: _lora_matches(LoraLinear, lora))),
    ]  # fmt: skip


@contextlib.contextmanager
def fused_ops(model: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Use the fused functions for ``model``'s family inside the block; yields whether any is
    on. Replaces the family's RMSNorm and MLP forwards, its rotary function and peft's LoRA
    ``Linear`` forward (class attributes, so every model of the family in the process is affected
    while the block runs), each only where it gives the numbers of the code it replaces, and
    restores them afterwards. A piece that fails its check keeps the model's own code, with one
    warning line per process."""
    module = family_module(model) if enabled else None
    if module is None:
        yield False
        return
    model_type = model.config.model_type
    pieces = replacements(module, model_type, model.config)
    failed = tuple(piece for piece, *_, ok in pieces if not ok)
    if failed and (model_type, *failed) not in _warned:
        _warned.add((model_type, *failed))
        import transformers

        print(
            f"warning: training.fused_ops: {model_type}'s {', '.join(failed)} code (transformers "
            f"{transformers.__version__}) does not give the numbers tuneforge's fused version was "
            "written for; running the model's own code for it",
            file=sys.stderr,
            flush=True,
        )
    saved = [(owner, attr, getattr(owner, attr)) for _, owner, attr, _, ok in pieces if ok]
    for _, owner, attr, fast, ok in pieces:
        if ok:
            setattr(owner, attr, fast)
    try:
        yield bool(saved)
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)
