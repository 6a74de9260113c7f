"""Whether a run folder's training is running, finished, stopped or crashed.

``tuneforge train`` keeps ``status.json`` in the run folder from the moment the folder is made:
``{"state": "running", "pid", "pid_start", "host", "started"}``, then ``finished``, ``stopped``
(interrupted: Ctrl-C / SIGINT at once, SIGTERM at the end of the step with a checkpoint;
``--resume`` continues it) or ``crashed`` (with the error). A process killed outright (SIGKILL,
power loss) cannot write anything: its folder still says ``running`` with a process that no
longer exists (or, on another machine, a folder that stopped changing), which reads as crashed.
The web UI (``tuneforge ui``) lists runs by this; it imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from tuneforge.files import write_atomic

STATUS_FILE = "status.json"
STALE_SECONDS = 30 * 60  # another machine's process silent this long is gone (runs, sweep workers)
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
        "pid_start": process_start(os.getpid()),
        "host": socket.gethostname(),
        "started": read(run_dir).get("started", now),  # a resumed run keeps its start
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


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot): with the pid, it names one
    process, not whichever later process reuses the number."""
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` runs on this machine, not a zombie, and (given ``start``) is the
    same process that recorded it."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat(pid)
    if fields is None:
        return True  # no /proc: trust the signal
    if fields[0] == "Z":  # exited; only its parent has not reaped it yet
        return False
    return start is None or process_start(pid) == start


def running_here(record: dict) -> bool:
    """A status.json record of a process that is alive on this machine."""
    return (
        record.get("state") == RUNNING
        and record.get("host") == socket.gethostname()
        and alive(record.get("pid"), record.get("pid_start"))
    )


# -- a graceful stop: SIGTERM ends the run after the step it is in, with a checkpoint ----------
_stop = threading.Event()


def _on_sigterm(signum, frame) -> None:
    if _stop.is_set():  # asked twice: stop now
        raise KeyboardInterrupt
    _stop.set()
    print("stopping after this step (a checkpoint is saved; --resume continues)", file=sys.stderr)


def stop_gracefully_on_sigterm() -> None:
    """``tuneforge train``: SIGTERM (``kill``, the web UI's Stop) asks the loop to save a
    checkpoint after the current step and stop; a second SIGTERM stops at once."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def stop_requested() -> bool:
    return _stop.is_set()


def status(run_dir: str | Path) -> str:
    """One of running, finished, stopped early, stopped, crashed, unknown."""
    run_dir = Path(run_dir)
    record = read(run_dir)
    state = record.get("state")
    if state == RUNNING:  # before summary.json: a finished run resumed again is running
        if record.get("host") != socket.gethostname():  # another machine (or container)
            return RUNNING if time.time() - last_change(run_dir) < STALE_SECONDS else CRASHED
        if running_here(record):
            return RUNNING
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            early = json.loads(summary.read_text()).get("stopped_early")
        except (OSError, ValueError):
            early = False
        return STOPPED_EARLY if early else FINISHED
    if state == RUNNING:
        return CRASHED  # its process is gone and wrote nothing
    if state in (STOPPED, CRASHED):
        return state
    return UNKNOWN  # a run from before status.json, that has no summary


def last_change(run_dir: Path) -> float:
    """When the run last wrote metrics or status (seconds since the epoch; 0 if never)."""
    times = []
    for name in ("metrics.jsonl", STATUS_FILE):
        try:
            times.append((run_dir / name).stat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)
