"""The command line: a map from command to function, one module per command group (train,
infer, eval, data, plan). Parsing and friendly errors only: a ``TuneforgeError`` becomes one
``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys

from tuneforge.errors import TuneforgeError


def build_parser() -> argparse.ArgumentParser:
    from tuneforge import __version__
    from tuneforge.cli import data, evaluate, infer, plan, sweep, train, ui

    p = argparse.ArgumentParser(
        prog="tuneforge",
        description="Fine-tune pretrained causal language models for your task.",
    )
    p.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (train, sweep, data, evaluate, infer, plan, ui):
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`train c.yaml --overwrite a.b=1`); argparse alone would
    # reject those, so collect key=value leftovers for train.
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    rest = [e for e in extra if e not in overrides]
    takes_overrides = ("train", "eval", "estimate")
    if rest or (overrides and args.command not in takes_overrides):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    if args.command in takes_overrides:
        args.overrides = list(args.overrides) + overrides
    try:
        if argv is None and args.command == "train":
            from tuneforge.accel.memory import reexec_with_jemalloc

            reexec_with_jemalloc()  # the same command again, faster and leaner (accel/memory.py)
        return args.func(args)
    except TuneforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tuneforge ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
