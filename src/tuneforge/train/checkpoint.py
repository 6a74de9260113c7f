"""Checkpoints that survive a crash: written to a temporary folder, then renamed.

A checkpoint holds the trainable weights (safetensors), optimizer and scheduler state, every RNG
state and the trainer state (step, data position, early-stopping bookkeeping), so resuming gives
bitwise the same run as never stopping.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from tuneforge.errors import TuneforgeError


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_weights_fit(params: dict[str, torch.nn.Parameter], names) -> None:
    """One clear line when a checkpoint names a weight this model/method does not have."""
    unknown = [n for n in names if n not in params]
    if unknown:
        raise TuneforgeError(
            f"checkpoint does not fit this model/method (unknown weight {unknown[0]}); "
            "resume with the config the run was started with"
        )


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    check_weights_fit(params, state)
    with torch.no_grad():
        for n, t in state.items():
            p = params[n]
            if isinstance(p, DTensor) and not isinstance(t, DTensor):  # FSDP2: this rank's shard
                t = distribute_tensor(
                    t.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                )
            p.copy_(t)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    best_state: dict[str, torch.Tensor] | None,
    keep: int,
    rng_states: list[dict] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write ``ckpt_root/step-N`` atomically and prune the oldest beyond ``keep``.

    ``weights`` and ``optimizer_state`` default to the model's trainable weights and
    ``optimizer.state_dict()``; a sharded (FSDP2) run passes the full tensors it gathered.

    Raises:
        TuneforgeError: the write failed (disk full, permissions); the previous checkpoint is
            left intact and the partial one removed.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp-step-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".tmp-step-{step}"
    try:
        return _write_checkpoint(
            ckpt_root,
            tmp,
            step,
            weights if weights is not None else trainable_state(model),
            optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            scheduler,
            trainer_state,
            best_state,
            keep,
            rng_states or [rng_state()],
        )
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        done = list_checkpoints(ckpt_root)
        prev = (
            f"the previous checkpoint {done[-1].name} is intact"
            if done
            else "no earlier checkpoint"
        )
        reason = e.strerror or type(e).__name__
        raise TuneforgeError(
            f"could not write checkpoint step-{step} in {ckpt_root} ({reason}); {prev}. "
            "Free disk space and continue with --resume"
        ) from None


def _write_checkpoint(
    ckpt_root: Path,
    tmp: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler,
    trainer_state: dict,
    best_state: dict | None,
    keep: int,
    rng_states: list[dict],
) -> Path:
    final = ckpt_root / f"step-{step}"
    tmp.mkdir()
    _save_tensors(weights, tmp / "trainable.safetensors")
    if best_state is not None:
        _save_tensors(best_state, tmp / "best.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"per_rank": rng_states}, tmp / "rng.pt")  # one entry per data-parallel rank
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a resumed run re-reaching a step it had saved before
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not ckpt_root.is_dir():
        return []
    done = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / "trainer_state.json").is_file()
    ]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(
    path: Path, model, optimizer, scheduler, rank: int = 0
) -> tuple[dict, dict | None]:
    """Restore weights, optimizer, scheduler and RNG; returns (trainer_state, best_state).

    A model sharded with FSDP2 loads the same full files on every rank and keeps its shard.
    """
    from tuneforge.train.fsdp import is_sharded, load_full_optimizer_state, load_full_weights

    weights = load_file(str(path / "trainable.safetensors"))
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    if is_sharded(model):
        load_full_weights(model, weights)
        load_full_optimizer_state(model, optimizer, optimizer_state)
    else:
        load_trainable_state(model, weights)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    per_rank = torch.load(path / "rng.pt", weights_only=True)["per_rank"]
    if rank >= len(per_rank):
        raise TuneforgeError(
            f"{path} was written by {len(per_rank)} process(es); resume with the same --nproc"
        )
    set_rng_state(per_rank[rank])
    best = path / "best.safetensors"
    best_state = load_file(str(best)) if best.is_file() else None
    return json.loads((path / "trainer_state.json").read_text()), best_state
