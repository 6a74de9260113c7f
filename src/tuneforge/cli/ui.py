"""`tuneforge ui`: the web dashboard over a folder of runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tuneforge.errors import TuneforgeError


def cmd_ui(args: argparse.Namespace) -> int:
    from tuneforge.ui.server import run_ui

    token = args.token or os.environ.get("TUNEFORGE_UI_TOKEN") or None
    root = Path(args.runs)
    if root.exists() and not root.is_dir():
        raise TuneforgeError(f"--runs {args.runs}: is a file; give the folder your runs are in")
    run_ui(root, args.host, args.port, token)
    return 0


def add_parsers(sub) -> None:
    u = sub.add_parser(
        "ui",
        help="web dashboard: watch, compare, launch, stop and chat with runs",
        description="Serve a web page over the runs under --runs: every run's status and "
        "numbers, live curves, comparisons, a form and YAML editor that launches `tuneforge "
        "train`, Stop / Resume / Evaluate, and chat with a run's model. Loopback only unless "
        "--host says otherwise; then an access token is required.",
    )
    u.add_argument("--runs", default="runs", help="the folder of run folders (default: runs)")
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    u.add_argument("--port", type=int, default=7860, help="TCP port (0: pick a free one)")
    u.add_argument(
        "--token",
        default=None,
        help="access token (default: TUNEFORGE_UI_TOKEN; generated and printed when --host is "
        "not loopback); required on every request when set",
    )
    u.set_defaults(func=cmd_ui)
