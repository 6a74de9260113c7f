"""Writing files and folders atomically: into a temporary name beside the target, renamed into
place only when the write succeeded, so a reader (or a crash) never sees half an output.

``atomic_path`` is for a user-named output file (it refuses a folder, a missing parent or an
input as the target, in one line); ``write_atomic`` for a file the program names;
``atomic_folder`` for a whole folder (a saved model, adapter or run). Checkpoints keep their own
writer (``train/checkpoint.py``): they also fsync before the rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tuneforge.errors import TuneforgeError


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: racing writers


@contextlib.contextmanager
def atomic_path(path: str | Path, inputs: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """A temporary path in ``path``'s folder that replaces ``path`` only if the block succeeds.

    Raises:
        TuneforgeError: the folder does not exist, the path is a folder, or it is one of ``inputs``.
    """
    path = Path(path)
    if path.is_dir():
        raise TuneforgeError(f"{path}: is a folder; give a file name for the output")
    if not path.parent.is_dir():
        raise TuneforgeError(f"{path}: the folder {path.parent} does not exist")
    for inp in inputs:
        if path.resolve() == Path(inp).resolve():
            raise TuneforgeError(f"{path}: the output would replace an input; write another file")
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_output_folder(path: str | Path, overwrite: bool) -> None:
    """Refuse, in one line, to replace a folder (or file) that holds something, unless asked."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())) and not overwrite:
        raise TuneforgeError(f"'{path}' already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``path``; when the block succeeds it replaces ``path``
    (an existing folder there is removed first), otherwise it is removed."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
