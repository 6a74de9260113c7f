"""Multi-process data-parallel training with torch.distributed (gloo on CPU, nccl on GPU).

Every rank holds the model, reads the same data and takes its slice of each global micro-batch.
Each rank divides its summed loss by the units (supervised tokens) of the whole global window,
and gradients are summed across ranks after backward: exactly the gradient one process would get
with the whole window, which is what DDP computes (we all-reduce once per optimizer step instead of
overlapping with backward; adapter gradients are small). Only rank 0 writes checkpoints, logs and
the progress bar. Full fine-tuning shards the model instead of replicating it: see ``fsdp.py``.

Launch: ``tuneforge train CONFIG --nproc N`` (spawns N local ranks), or ``torchrun --nproc-per-node
N -m tuneforge train CONFIG`` for several nodes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: float | int) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients across ranks in one flat buffer."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_from_env(device_type: str = "cpu") -> Dist:
    """Join the process group that torchrun or ``--nproc`` described in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        # on GPUs, gloo still carries the CPU tensors (token counts, losses, RNG states)
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank, world, local_rank)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int) -> int:
    """Run ``tuneforge <argv>`` as ``nproc`` local ranks; rank 0 talks to the terminal.

    Returns rank 0's exit status (or the first failing rank's, with its last lines shown).
    """
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs, logs = [], []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
        }
        log = None if rank == 0 else tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        procs.append(
            subprocess.Popen([sys.executable, "-m", "tuneforge", *argv], env=env, stderr=log)
        )
    import time

    # If one rank dies the others would wait in a collective forever: stop them all.
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    codes = [p.wait() for p in procs]
    if codes[0] != 0:
        return codes[0]
    for rank, code in enumerate(codes):
        if code != 0:
            logs[rank].seek(0)
            tail = logs[rank].read().strip().splitlines()[-5:]
            print(f"error: rank {rank} failed (exit {code}): " + " | ".join(tail), file=sys.stderr)
            return code
    return 0
