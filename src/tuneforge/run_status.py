"""Whether a run folder's training is running, finished, stopped or crashed.

``tuneforge train`` keeps ``status.json`` in the run folder from the moment the folder is made:
``{"state": "running", "pid", "host", "started"}``, then ``finished``, ``stopped`` (interrupted:
Ctrl-C, SIGINT or SIGTERM; ``--resume`` continues it) or ``crashed`` (with the error). A process
killed outright (SIGKILL, power loss) cannot write anything: its folder still says ``running``
with a process that no longer exists, which reads as crashed. The web UI (``tuneforge ui``)
lists runs by this; it imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from tuneforge.files import write_atomic

STATUS_FILE = "status.json"
# what ``status`` returns
RUNNING, FINISHED, STOPPED_EARLY, STOPPED, CRASHED, UNKNOWN = (
    "running",
    "finished",
    "stopped early",
    "stopped",
    "crashed",
    "unknown",
)


def mark(run_dir: str | Path, state: str, error: str | None = None) -> None:
    """Record ``state`` for this process's run in ``run_dir/status.json`` (atomically)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    record = {
        "state": state,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": now if state == RUNNING else read(run_dir).get("started", now),
        "updated": now,
    }
    if error and error.strip():
        record["error"] = error.strip().splitlines()[0][:500]
    write_atomic(Path(run_dir) / STATUS_FILE, json.dumps(record, indent=1))


def read(run_dir: str | Path) -> dict:
    """``status.json`` of ``run_dir`` ({} when missing or unreadable)."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent has not reaped it yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def status(run_dir: str | Path) -> str:
    """One of running, finished, stopped early, stopped, crashed, unknown."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            early = json.loads(summary.read_text()).get("stopped_early")
        except (OSError, ValueError):
            early = False
        return STOPPED_EARLY if early else FINISHED
    record = read(run_dir)
    state = record.get("state")
    if state == RUNNING:
        here = record.get("host") == socket.gethostname()
        pid = record.get("pid")
        if not here:
            return RUNNING  # another machine's process: nothing here can tell
        return RUNNING if isinstance(pid, int) and alive(pid) else CRASHED
    if state in (STOPPED, CRASHED):
        return state
    return UNKNOWN  # a run from before status.json, that has no summary
