"""Fixtures of the web UI's tests: a runs folder with finished tiny-llama runs, a real
`tuneforge ui` process on a free port, and headless Chromium (Debian's) driven by playwright."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ROOT, tiny_config, write_jsonl

CHROMIUM_FLAGS = [  # this machine's closed network refuses Chromium's background connections
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def dates_data(folder: Path) -> tuple[Path, Path]:
    import json

    rows = [json.loads(x) for x in (ROOT / "examples/dates/train.jsonl").read_text().splitlines()]
    return (
        write_jsonl(folder / "train.jsonl", rows[:24]),
        write_jsonl(folder / "eval.jsonl", rows[24:30]),
    )


def train_run(root: Path, name: str, train: Path, eval_: Path, **overrides) -> Path:
    """A finished tiny-llama LoRA run in ``root/name``."""
    from tuneforge.train import train as train_config

    settings = {"output_dir": str(root / name), "training.eval_steps": 2, **overrides}
    train_config(tiny_config(root.parent, train, eval_, **settings))
    return root / name


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """``work/runs`` with two finished runs that differ in learning rate and rank; data files
    in ``work``."""
    work = tmp_path_factory.mktemp("ui")
    train, eval_ = dates_data(work)
    root = work / "runs"
    train_run(root, "lr-low", train, eval_, **{"training.learning_rate": 1e-4})
    train_run(root, "lr-high", train, eval_, **{"training.learning_rate": 5e-2, "method.r": 8})
    return root


def tuneforge(*args: str, cwd: Path) -> tuple[int, str, str]:
    """``tuneforge ARGS`` run in this process from ``cwd``: (exit status, stdout, stderr). The
    same code path as the command (cli.main), without a new interpreter's seconds of imports."""
    from tuneforge.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    sigterm = signal.getsignal(signal.SIGTERM)  # `train` installs its own
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(here)
        signal.signal(signal.SIGTERM, sigterm)
    return code, out.getvalue(), err.getvalue()


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, token: str | None):
        self.proc, self.url, self.token = proc, url, token


def start_ui(root: Path, *args: str, cwd: Path | None = None) -> Server:
    """``tuneforge ui --runs ROOT --port 0 ARGS`` in ``cwd`` (default: root's parent); returns
    once it printed its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "ui", "--runs", str(root), "--port", "0", *args],
        cwd=cwd or root.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in proc.stdout:
        found = re.match(r"open (http://\S+?/)(?:\?token=(\S+))?$", line.strip())
        if found:
            return Server(proc, found.group(1), found.group(2))
    proc.kill()
    raise AssertionError(f"tuneforge ui printed no address: {proc.stderr.read()}")


def stop_ui(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="module")
def ui(runs_root):
    server = start_ui(runs_root)
    yield server
    stop_ui(server)


def chromium_path() -> str | None:
    return os.environ.get("TUNEFORGE_CHROMIUM") or next(
        filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser"))), None
    )


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (make install adds Debian's package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"
