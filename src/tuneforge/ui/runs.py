"""Reading the run folders under the UI's root: which folders are runs, their status and numbers,
their curves, and the differences between runs. Every path a request names goes through
``inside`` first: the UI reads and writes nothing outside its root."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from urllib.parse import quote

import yaml

from tuneforge import run_status
from tuneforge.errors import TuneforgeError

UI_DIR = ".ui"  # the UI's own files under the root: launched configs, job records, logs
SKIP = {"checkpoints", "adapter", "model", UI_DIR, "__pycache__"}
MAX_DEPTH = 4  # sweep trials sit at root/sweep/trials/SETTING/seed-N


class PathRefused(TuneforgeError):
    """A path outside the UI's root (absolute, with '..', or through a link out)."""


def inside(root: Path, rel: str) -> Path:
    """``root/rel``, resolved, if it stays under ``root``; else ``PathRefused``."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel or "\x00" in rel:
        raise PathRefused(f"'{rel}' is not a path under the runs folder")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise PathRefused(f"'{rel}' leads outside the runs folder")
    return path


def is_run_folder(path: Path) -> bool:
    """A training run's folder: config.yaml, and what training writes beside it."""
    return (path / "config.yaml").is_file() and any(
        (path / name).exists() for name in ("metrics.jsonl", "summary.json", "status.json")
    )


def find_runs(root: Path) -> list[Path]:
    """Every run folder under ``root`` (not inside another run), newest first."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return
        for child in children:
            if child.name in SKIP or child.name.startswith("."):
                continue
            if is_run_folder(child):
                found.append(child)
            elif depth < MAX_DEPTH:
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 1)
    return sorted(found, key=started_at, reverse=True)


def started_at(run: Path) -> float:
    """When the run started: its config.yaml is written as training begins."""
    try:
        return (run / "config.yaml").stat().st_mtime
    except OSError:
        return 0.0


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_config(run: Path) -> dict:
    try:
        data = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(run: Path, since: int = 0) -> tuple[list[dict], int]:
    """The records of ``metrics.jsonl`` from line ``since`` on, and the line to ask from next.
    A last line still being written (no newline yet) waits for the next call."""
    try:
        with open(run / "metrics.jsonl", "rb") as f:
            data = f.read()
    except OSError:
        return [], since
    lines = data.split(b"\n")[:-1]  # the part after the last newline is incomplete
    records = []
    for line in lines[since:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
    return records, len(lines)


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"training": {"seed": 1}}`` -> ``{"training.seed": 1}``."""
    out: dict = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def eval_metric(run: Path) -> dict | None:
    """The evaluated run's first task metric, fine-tuned, with the base model's zero-shot."""
    results = read_json(run / "eval.json")
    scores, primary = results.get("scores"), results.get("primary_metric")
    if not isinstance(scores, dict) or not primary:
        return None
    from tuneforge.eval.baselines import BASE_ZERO, TUNED

    tuned = (scores.get(TUNED) or {}).get(primary)
    base = (scores.get(BASE_ZERO) or {}).get(primary)
    return {"name": primary, "value": tuned, "base": base}


_ROWS: dict[Path, tuple[tuple, dict]] = {}  # run -> (its files' versions, its numbers)
WATCHED = ("config.yaml", "metrics.jsonl", "summary.json", "status.json", "eval.json")


def run_row(root: Path, run: Path) -> dict:
    """One line of the runs table. The numbers are read again only when one of the run's
    files changed (the table refreshes every few seconds); the status always."""
    version = tuple(_version(run / name) for name in WATCHED)
    cached = _ROWS.get(run)
    if cached is None or cached[0] != version:
        cached = (version, _numbers(run))
        _ROWS[run] = cached
    state = run_status.read(run)
    return {
        "id": run.relative_to(root).as_posix(),
        "status": run_status.status(run),
        **cached[1],
        "started": state.get("started") or _iso(started_at(run)),
        "error": state.get("error"),
    }


def _version(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size)


def _numbers(run: Path) -> dict:
    cfg = read_config(run)
    training = cfg.get("training") or {}
    method = cfg.get("method") or {}
    summary = read_json(run / "summary.json")
    records, _ = read_metrics(run)
    steps = [r["step"] for r in records]
    evals = [r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), int | float)]
    speeds = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), int | float)]
    return {
        "model": cfg.get("model"),
        "method": method.get("name") if isinstance(method, dict) else method,
        "objective": training.get("objective", "sft"),
        "step": summary.get("steps", max(steps) if steps else 0),
        "total_steps": summary.get("total_steps") or training.get("max_steps") or None,
        "best_eval_loss": summary.get("best_eval_loss", min(evals) if evals else None),
        "eval": eval_metric(run),
        "tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
    }


def _iso(seconds: float) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds)) if seconds else None


def tail(path: Path, lines: int = 80) -> str:
    """The last ``lines`` lines of a text file ('' if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # progress bars redraw with \r: keep what the terminal would show last
    shown = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines()]
    return "\n".join(shown[-lines:])


def run_detail(root: Path, run: Path) -> dict:
    """The run page: its row, resolved config, summary, evaluation and files."""
    try:
        config_text = (run / "config.yaml").read_text()
    except OSError:
        config_text = ""
    results = read_json(run / "eval.json")
    report = next((n for n in ("report.html", "report.md") if (run / n).is_file()), None)
    rel = run.relative_to(root).as_posix()
    return {
        **run_row(root, run),
        "config_text": config_text,
        "summary": read_json(run / "summary.json"),
        "eval_verdict": results.get("verdict"),
        "advice": results.get("advice") or read_json(run / "summary.json").get("advice") or [],
        "report": "/files/" + quote(f"{rel}/{report}") if report else None,
        "checkpoints": sorted(p.name for p in (run / "checkpoints").glob("step-*")),
    }


def compare(root: Path, runs: list[Path]) -> dict:
    """Side by side: each run's settings and numbers, and the settings that differ."""
    rows = [run_row(root, run) for run in runs]
    configs = [flatten(read_config(run)) for run in runs]
    keys = sorted(set().union(*configs)) if configs else []
    differ = [  # output_dir always differs: listed under "show all" only
        k for k in keys
        if k != "output_dir" and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1
    ]  # fmt: skip
    settings = {k: [c.get(k) for c in configs] for k in keys}
    return {"runs": rows, "settings": settings, "differ": differ}
