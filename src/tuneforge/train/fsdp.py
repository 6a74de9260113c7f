"""FSDP2 for full fine-tuning across ranks: every weight, gradient and optimizer state sharded.

With ``method.name: full`` and more than one rank, ``shard_model`` applies
``torch.distributed.fsdp.fully_shard`` to each decoder layer, then to the root model, whose group
holds what is left: the token embeddings, the LM head (tied to the embeddings in SmolLM2 and the
tiny test models, so one parameter in one group), the final norm and any head an objective wraps
around the LM (a reward model's score). Each parameter becomes a
DTensor sharded on dim 0 across the ranks; a layer's weights are all-gathered just before its
forward and backward and freed after, and its gradients are reduce-scattered, so each rank keeps
1/N of the weights, gradients and AdamW moments.

Gradients are reduce-scattered as a plain sum (divide factor 1): the loop already divides each
rank's summed loss by the supervised tokens of the whole global window, exactly as on the
data-parallel path, so N ranks with batch b give the gradient of 1 rank with batch N*b.

Checkpoints hold full, unsharded tensors in the single-process layout (weights by parameter name,
optimizer state by parameter index as ``Optimizer.state_dict()`` writes it), so a run saved by N
ranks resumes on M ranks or on one. Gathering (``get_*_state_dict``) is a collective every rank
joins; the full tensors land on rank 0's CPU and the other ranks get empty dicts.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from tuneforge.errors import TuneforgeError
from tuneforge.train.checkpoint import check_weights_fit
from tuneforge.train.distributed import Dist

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: torch.nn.Module, dist: Dist, device: torch.device, layers=None) -> None:
    """Shard ``model`` in place with FSDP2: one group per decoder layer, then the root.

    ``layers``: the decoder layers when ``model`` wraps the LM (a reward model: its score head
    joins the root group); by default ``model.get_decoder().layers``. Call before the optimizer
    is built: it must hold the sharded (DTensor) parameters.
    """
    mesh = init_device_mesh(device.type, (dist.world,))
    for layer in model.get_decoder().layers if layers is None else layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # embeddings, tied LM head, final norm
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # sum, not average: the loss is already normalised by the global token count
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``model`` was sharded by ``shard_model`` (its parameters are DTensors)."""
    return isinstance(model, FSDPModule)


def to_float(value: torch.Tensor | float) -> float:
    """A Python float from a tensor that may be a replicated DTensor (e.g. a global grad norm)."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    """The global L2 norm of the gradients of (possibly sharded) parameters."""
    grads = [p.grad for p in params if p.grad is not None]
    return to_float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def full_weights(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU tensors by parameter name on rank 0, ``{}`` elsewhere; every rank must call it.

    Names are those of ``model.named_parameters()`` (a tied LM head is not repeated), plus the
    persistent buffers when ``trainable_only`` is False: what a single process saves.
    """
    state = get_model_state_dict(model, options=_GATHER)
    params = dict(model.named_parameters())
    keep = {n for n, p in params.items() if p.requires_grad or not trainable_only}
    if not trainable_only:
        keep |= {n for n, _ in model.named_buffers()}
    return {n: t for n, t in state.items() if n in keep}


def gather_full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full CPU copies of sharded tensors (e.g. the best weights kept in memory); a collective."""
    return {
        n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
        for n, t in tensors.items()
    }


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's index order (the keys ``state_dict()`` uses)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state, unsharded, in ``Optimizer.state_dict()`` layout on rank 0; ``{}``
    elsewhere. Every rank must call it."""
    state = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not state:
        return {}
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return {
        "state": {index[n]: s for n, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


def load_full_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load full tensors (every rank passes the same dict) into the sharded model."""
    check_weights_fit(dict(model.named_parameters()), weights)
    # not strict: a tied LM head is saved once, under the embeddings' name. A copy: torch swaps
    # the dict's values for this rank's shards.
    weights = dict(weights)
    set_model_state_dict(
        model, weights, options=StateDictOptions(full_state_dict=True, strict=False)
    )


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load a full optimizer state in ``Optimizer.state_dict()`` layout (saved by one rank or by
    ``full_optimizer_state``) into the optimizer of the sharded model; every rank passes it."""
    names = _param_names(model, optimizer)
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise TuneforgeError(
            "checkpoint optimizer state does not fit this model/method; "
            "resume with the config the run was started with"
        )
    by_name = {
        "state": {names[i]: dict(s) for i, s in state["state"].items()},  # torch edits these
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, by_name, options=StateDictOptions(full_state_dict=True)
    )
