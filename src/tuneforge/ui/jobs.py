"""The ``tuneforge`` processes the UI starts (train, resume, eval) and stops.

Each job runs as its own process, in a session of its own (closing the UI leaves it training),
with its output in ``ROOT/.ui/logs/JOB.log`` and its record in ``ROOT/.ui/jobs/JOB.json``, so
a restarted UI still knows its jobs. Only ``python -m tuneforge ...`` is ever started; Stop sends
SIGTERM, on which a run saves a checkpoint after its step and stops: its status.json says
stopped, ``--resume`` continues it. A process is named by its pid and start time, so a pid that
a later process reuses is never signalled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tuneforge import run_status
from tuneforge.errors import TuneforgeError
from tuneforge.files import write_atomic
from tuneforge.ui.runs import UI_DIR

KINDS = ("train", "resume", "eval")


class Busy(TuneforgeError):
    """The run already has a job running."""


class Jobs:
    def __init__(self, root: Path, cwd: Path):
        self.root = root
        self.cwd = cwd  # relative paths in launched configs mean what they meant in the form
        self.records = root / UI_DIR / "jobs"
        self.logs = root / UI_DIR / "logs"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, kind: str, run: str, args: list[str]) -> dict:
        """Start ``tuneforge ARGS`` for run folder ``run`` (relative to the root)."""
        assert kind in KINDS
        if self.active(run):
            raise Busy(f"'{run}' already has a job running; stop it first")
        self.records.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        log = self.logs / f"{job_id}.log"
        cmd = [sys.executable, "-m", "tuneforge", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs[job_id] = proc
        record = {
            "id": job_id,
            "kind": kind,
            "run": run,
            "pid": proc.pid,
            "pid_start": run_status.process_start(proc.pid),
            "command": ["tuneforge", *args],
            "log": log.relative_to(self.root).as_posix(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "returncode": None,
        }
        self._save(record)
        return record

    def _save(self, record: dict) -> None:
        write_atomic(self.records / f"{record['id']}.json", json.dumps(record, indent=1))

    def all(self) -> list[dict]:
        """Every job record, newest first, with finished processes' exit codes filled in."""
        out = []
        for path in sorted(self.records.glob("*.json"), reverse=True):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("returncode") is None:
                proc = self.procs.get(record["id"])
                if proc is not None:
                    code = proc.poll()
                    if code is not None:
                        record["returncode"] = code
                        self._save(record)
                        self.procs.pop(record["id"], None)
                elif not run_status.alive(record["pid"], record.get("pid_start")):
                    record["returncode"] = "unknown"  # started by an earlier UI process
                    self._save(record)
            record["running"] = record["returncode"] is None
            out.append(record)
        return out

    def for_run(self, run: str) -> list[dict]:
        return [j for j in self.all() if j["run"] == run]

    def active(self, run: str) -> dict | None:
        return next((j for j in self.for_run(run) if j["running"]), None)

    def stop(self, run: str, run_dir: Path) -> int:
        """SIGTERM to the run's job: the UI's own, or a `tuneforge train` started in a terminal
        (status.json's process, the same one that wrote it). Returns the pid."""
        job = self.active(run)
        pid = job["pid"] if job else None
        if pid is None:
            state = run_status.read(run_dir)
            if run_status.running_here(state) and _is_tuneforge_train(state["pid"]):
                pid = state["pid"]
        if pid is None:
            raise TuneforgeError(f"'{run}' is not running")
        os.kill(pid, signal.SIGTERM)
        return pid


def _is_tuneforge_train(pid: int) -> bool:
    """Whether ``pid``'s command line is ``... tuneforge train ...`` (not ``ui`` or ``serve``)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
    except OSError:
        return False
    return any(
        a.endswith(b"tuneforge") and b"train" in args[i + 1 : i + 2] for i, a in enumerate(args)
    )
