"""``train(config)``: every objective through the one run skeleton (train/run.py)."""

from __future__ import annotations

from tuneforge.config import Config
from tuneforge.errors import TuneforgeError
from tuneforge.train.run import (  # noqa: F401  (the package's API)
    ObjectiveRun,
    check_fsdp_optimizer,
    check_run_dir,
    prepare_for_speed,
    run,
    save_trained,
    seed_everything,
)


def objective_run(cfg: Config, loss=None) -> ObjectiveRun:
    """The ``ObjectiveRun`` for ``training.objective``; ``loss``: an SFT loss object in place
    of the default (``units(batch)``, ``loss_sum(model, batch)``; see train/loop.py)."""
    name = cfg.training.objective
    if name == "sft":
        from tuneforge.train.sft import SFTRun

        return SFTRun(loss)
    if loss is not None:
        raise ValueError("a custom loss object applies to objective sft")
    if name in ("reward", "dpo", "orpo", "simpo"):
        from tuneforge.train.preference import PairRun

        return PairRun(name)
    if name == "kto":
        from tuneforge.train.kto import KTORun

        return KTORun()
    if name == "ppo":
        from tuneforge.train.ppo import PPORun

        return PPORun()
    if name == "grpo":
        from tuneforge.train.grpo import GRPORun

        return GRPORun()
    raise ValueError(f"unknown objective {name}")  # config validation prevents this


def train(
    cfg: Config, resume: bool = False, overwrite: bool = False, objective=None, loggers=None
) -> dict:
    """Fine-tune ``cfg.model`` as configured; returns the run summary (also saved as summary.json).

    Everything that can fail because of the user's input (config, model reference, data) is checked
    before the run folder is created or changed. Under torchrun / ``--nproc`` every rank runs this;
    only rank 0 writes. ``objective``: a custom SFT loss object (see ``objective_run``).
    ``loggers``: objects with ``log(record)`` and ``close()`` that get every metrics.jsonl record
    besides ``training.report_to``'s (rank 0 only; e.g. the sweep's pruning hook).
    """
    if cfg.sweep.params:
        raise TuneforgeError(
            "the config has a sweep section with params: run it with `tuneforge sweep CONFIG`; "
            "`tuneforge train` trains one setting (remove the sweep section, or use a sweep's "
            "best.yaml)"
        )
    return run(
        cfg, objective_run(cfg, objective), resume=resume, overwrite=overwrite, loggers=loggers
    )
