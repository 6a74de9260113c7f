"""Mixed precision: the dtype the weights are held in, the dtype the matmuls run in, and loss
scaling, for every loop (train/loop.py, train/rollout.py) and what runs before them (DPO's
reference log-probs, the guards' starting answers).

``training.dtype`` resolved (models.pick_dtype) is the **compute** dtype. When it is bfloat16 or
float16, the loops run under ``torch.autocast`` to it, and with ``training.master_weights`` (the
default) every trainable weight is held in float32: AdamW's update lands on an fp32 weight
instead of rounding away against a bf16 step (an update under half a bf16 step, ~0.4% of the
weight, is lost; one step of full fine-tuning at lr 2e-5 changed 30% of the bf16 weights of
tiny-llama against 100% in fp32). Frozen weights stay in the compute dtype: the base of an
adapter method costs no more memory than before. Full fine-tuning therefore loads its base in
float32 and saves it in the compute dtype (what the user asked the model to be).

float16 has too few exponent bits for small gradients: its runs scale the loss before backward
and unscale the gradients before clipping (``torch.amp.GradScaler``, dynamic: the scale halves
when a step's gradients overflow, that step is skipped, and it doubles after 2000 clean steps).
float16 weights that train (``master_weights: false``) cannot be unscaled in place, so that
combination is refused at config time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from tuneforge.models import pick_dtype


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype  # what the matmuls run in
    device_type: str  # autocast and the grad scaler are per device type
    master: bool  # trainable weights in float32 under bf16 / fp16 compute

    @classmethod
    def of(cls, t, device: torch.device) -> Precision:
        """The precision of a run from its ``training`` section and device."""
        return cls(pick_dtype(t.dtype, device), device.type, bool(t.master_weights))

    @property
    def half(self) -> bool:
        return self.compute != torch.float32

    def load_dtype(self, trains_base: bool) -> torch.dtype:
        """The dtype the base is loaded in: float32 when its own weights train with master
        weights (a float32 checkpoint is not rounded first), else the compute dtype."""
        return torch.float32 if trains_base and self.master else self.compute

    def autocast(self):
        """Autocast to the compute dtype (nothing under float32)."""
        if not self.half:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def keep_master_weights(self, model: torch.nn.Module) -> None:
        """Hold every trainable floating-point weight in float32 (adapters that a method made in
        the base's dtype, a reward head); frozen ones keep theirs."""
        if not (self.half and self.master):
            return
        for p in model.parameters():
            if p.requires_grad and p.dtype.is_floating_point and p.dtype != torch.float32:
                p.data = p.data.float()

    def saved_weights(self, model: torch.nn.Module, state_dict: dict | None) -> dict | None:
        """The weights to save for a fully fine-tuned ``model``: in the compute dtype when
        master weights held them in float32 (None: the model's own, unchanged)."""
        if not (self.half and self.master):
            return state_dict
        weights = state_dict if state_dict is not None else model.state_dict()
        cast: dict[int, torch.Tensor] = {}  # tied weights (embedding, head) stay one tensor

        def to_compute(v: torch.Tensor) -> torch.Tensor:
            if v.dtype != torch.float32:
                return v
            key = v.untyped_storage().data_ptr() + v.storage_offset() * v.element_size()
            if key not in cast:
                cast[key] = v.detach().to(self.compute)
            return cast[key]

        return {k: to_compute(v) for k, v in weights.items()}

    @property
    def dtype_name(self) -> str:
        return str(self.compute).removeprefix("torch.")

    def grad_scaler(self) -> LossScaler:
        return LossScaler(self.device_type, enabled=self.compute == torch.float16)


class LossScaler:
    """float16's dynamic loss scaling, the same calls for every loop; under bf16 and fp32 each
    call is a plain backward / step. The order, once per optimizer step::

        scaler.backward(loss)          # every micro-batch
        scaler.unscale(optimizer)      # before clipping and the gradient norm
        scaler.step(optimizer)         # (the loop may skip it: a non-finite loss)
        scaler.update()                # after every step, skipped or not

    With the gradients unscaled before the norm, a step overflowed exactly when the scaler is
    enabled, the loss is finite and the gradient norm is not: the loop reads it from there.
    """

    INIT_SCALE = 2.0**16  # torch's default

    def __init__(self, device_type: str, enabled: bool):
        self.enabled = enabled
        self.scaler = torch.amp.GradScaler(device_type, self.INIT_SCALE, enabled=enabled)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, skipped by the scaler when the gradients overflowed."""
        self.scaler.step(optimizer)

    def update(self) -> None:
        """Adjust the scale after a step: halved when its gradients overflowed."""
        self.scaler.update()

    @property
    def scale(self) -> float | None:
        return self.scaler.get_scale() if self.enabled else None

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.enabled else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)
