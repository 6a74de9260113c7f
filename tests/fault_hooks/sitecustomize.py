"""Fault injection for the tests, kept out of tuneforge's code.

``run_cli`` puts this folder on ``PYTHONPATH`` when a test asks for a fault, so every tuneforge
process it starts (and the ranks ``--nproc`` starts) imports it at start-up and patches:

- ``TUNEFORGE_FAULT_KILL_AT_STEP=N``: SIGKILL right after optimizer step N (PPO, GRPO: the
  updates of rollout step N), before its metrics line or checkpoint is written;
- ``TUNEFORGE_FAULT_NAN_STEPS=3,4``: those steps' losses are NaN (every micro-batch);
- ``TUNEFORGE_FAULT_KILL_IN_CHECKPOINT=N``: SIGKILL inside the write of checkpoint ``step-N``,
  when every file is in its temporary folder but before the folder is renamed.

In-process tests call ``poison_steps`` / ``kill_at_step`` with pytest's ``monkeypatch``.
"""

from __future__ import annotations

import os
import signal

FAULTS = (
    "TUNEFORGE_FAULT_KILL_AT_STEP",
    "TUNEFORGE_FAULT_NAN_STEPS",
    "TUNEFORGE_FAULT_KILL_IN_CHECKPOINT",
)


class _Poisoned:
    """An objective whose losses are NaN: the loop must skip the step."""

    def __init__(self, objective):
        self.objective = objective

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def loss_sum(self, model, batch):
        result = self.objective.loss_sum(model, batch)
        if isinstance(result, tuple):
            return result[0] * float("nan"), result[1]
        return result * float("nan")


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def poison_steps(setattr, steps: set[int]) -> None:
    """Make optimizer steps ``steps`` (1-based) see a NaN loss; ``setattr``: monkeypatch.setattr
    or the builtin."""
    from tuneforge.train.loop import Trainer

    plain = Trainer.accumulate_gradients

    def accumulate_gradients(self, step):
        if step + 1 not in steps:
            return plain(self, step)
        objective, self.objective = self.objective, _Poisoned(self.objective)
        try:
            return plain(self, step)
        finally:
            self.objective = objective

    setattr(Trainer, "accumulate_gradients", accumulate_gradients)


def kill_at_step(setattr, n: int) -> None:
    """SIGKILL the process once optimizer step ``n`` (1-based) has run; for PPO and GRPO, once
    the updates of rollout step ``n`` have run."""
    from tuneforge.train.grpo import GRPOTrainer
    from tuneforge.train.loop import Trainer
    from tuneforge.train.ppo import PPOTrainer

    plain = Trainer.train_step

    def train_step(self, step):
        out = plain(self, step)
        if step + 1 == n:
            _kill()
        return out

    setattr(Trainer, "train_step", train_step)

    for cls in (PPOTrainer, GRPOTrainer):
        setattr(cls, "optimise", _killing_optimise(cls.optimise, n))


def _killing_optimise(plain, n: int):
    def optimise(self, rollout, step):
        out = plain(self, rollout, step)
        if step + 1 == n:
            _kill()
        return out

    return optimise


def kill_in_checkpoint(setattr, n: int) -> None:
    """SIGKILL inside the write of checkpoint ``step-n``, before its folder is renamed."""
    from tuneforge.train import checkpoint

    plain = checkpoint._fsync_dir

    def fsync_dir(path):
        if path.name == f".tmp-step-{n}":
            _kill()
        return plain(path)

    setattr(checkpoint, "_fsync_dir", fsync_dir)


def install(env=os.environ) -> None:
    if env.get("TUNEFORGE_FAULT_KILL_AT_STEP"):
        kill_at_step(setattr, int(env["TUNEFORGE_FAULT_KILL_AT_STEP"]))
    if env.get("TUNEFORGE_FAULT_NAN_STEPS"):
        poison_steps(setattr, {int(x) for x in env["TUNEFORGE_FAULT_NAN_STEPS"].split(",") if x})
    if env.get("TUNEFORGE_FAULT_KILL_IN_CHECKPOINT"):
        kill_in_checkpoint(setattr, int(env["TUNEFORGE_FAULT_KILL_IN_CHECKPOINT"]))


if any(os.environ.get(name) for name in FAULTS):
    install()
