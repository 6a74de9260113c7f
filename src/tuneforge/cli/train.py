"""`tuneforge train` and `tuneforge config-reference`."""

from __future__ import annotations

import argparse
import os

from tuneforge.errors import TuneforgeError


def cmd_train(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config
    from tuneforge.train import train

    cfg = load_config(args.config, args.overrides)
    if args.resume and args.overwrite:
        raise TuneforgeError("--resume and --overwrite contradict each other; pick one")
    if args.nproc < 1:
        raise TuneforgeError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:  # before the processes start: the run skeleton's own check, once
        from tuneforge.train import objective_run
        from tuneforge.train.run import check_processes

        check_processes(cfg, objective_run(cfg), args.nproc)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from tuneforge.train.distributed import launch

        argv = ["train", args.config, *args.overrides]
        argv += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
        return launch(argv, args.nproc)
    # SIGTERM (`kill`, the web UI's Stop): a checkpoint after this step, then status.json says
    # stopped and --resume continues from there (run_status.py)
    from tuneforge.run_status import stop_gracefully_on_sigterm

    stop_gracefully_on_sigterm()
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from tuneforge.config import config_reference

    print(config_reference())
    return 0


def add_parsers(sub) -> None:
    t = sub.add_parser(
        "train",
        help="fine-tune a model as a YAML config says",
        description="Fine-tune a model. Override any config key with key=value, e.g. "
        "training.learning_rate=1e-4 method.r=8. `tuneforge config-reference` lists every key.",
    )
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    t.add_argument(
        "--resume", action="store_true", help="continue from the run's latest checkpoint"
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    t.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (gloo on CPU, nccl on GPU); "
        "training.batch_size is per process. For several nodes use torchrun -m tuneforge train",
    )
    t.set_defaults(func=cmd_train)

    r = sub.add_parser(
        "config-reference", help="print every config key with its default and meaning"
    )
    r.set_defaults(func=cmd_config_reference)
