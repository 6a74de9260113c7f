"""Read JSONL records one line at a time (memory stays flat as files grow); write outputs atomically.

``scan`` reports every unreadable line (wrong encoding, invalid or cut-off JSON, a huge line) as a
``BadLine`` and goes on, so ``validate`` can list them all; ``read_stream`` stops at the first one
with a one-line error naming file and line, which is what every command that writes a file wants.
Other suffixes (.json, .csv, .parquet) are read whole through ``data.io`` (they are not streamable
formats); their records flow through the same code afterwards.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tuneforge.data.io import SUFFIXES, Record, read_records
from tuneforge.data.records import detect_format
from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_path

MAX_LINE_BYTES = 16 * 2**20  # a record longer than this on one line is almost surely not JSONL
_BOM = b"\xef\xbb\xbf"


@dataclass
class BadLine:
    """A line that could not be read as a record."""

    source: str  # file:line
    kind: str  # encoding | json | not-object | huge-line
    message: str

    def error(self) -> TuneforgeError:
        return TuneforgeError(f"{self.source}: {self.message}")


def check_input(path: str | Path) -> Path:
    """The path of an existing data file with a known suffix, else a one-line error."""
    path = Path(path)
    if not path.exists():
        raise TuneforgeError(f"{path}: data file not found")
    if path.is_dir():
        raise TuneforgeError(f"{path}: is a folder; give a .jsonl, .json, .csv or .parquet file")
    if path.suffix.lower() not in SUFFIXES:
        raise TuneforgeError(
            f"{path}: unknown data format '{path.suffix or '(none)'}'; "
            "use .jsonl, .json, .csv or .parquet"
        )
    return path


def _check_not_binary(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8192)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TuneforgeError(f"{path}:1: the file is UTF-16 encoded; re-save it as UTF-8")
    if b"\x00" in head:
        line = head[: head.index(b"\x00")].count(b"\n") + 1
        raise TuneforgeError(
            f"{path}:{line}: NUL bytes: this looks like a binary (or compressed) file, not UTF-8 text"
        )


def scan(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Record | BadLine]:
    """Every record of a data file in order, with a ``BadLine`` for each line that is not one.

    Raises:
        TuneforgeError: the file is missing, binary or UTF-16 (nothing line-wise can be said).
    """
    path = check_input(path)
    if path.suffix.lower() != ".jsonl":
        yield from read_records(path) if path.stat().st_size else []
        return
    _check_not_binary(path)
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            n += 1
            source = f"{path}:{n}"
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                _skip_rest_of_line(f)
                yield BadLine(
                    source,
                    "huge-line",
                    f"a line longer than {max_line_bytes // 2**20} MiB; JSONL needs one record "
                    "per line (is this really a .jsonl file?)",
                )
                continue
            if n == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            item = _parse_line(raw, source)
            if item is not None:
                yield item


def _skip_rest_of_line(f: IO[bytes]) -> None:
    while True:
        chunk = f.readline(2**20)
        if not chunk or chunk.endswith(b"\n"):
            return


def _parse_line(raw: bytes, source: str) -> Record | BadLine | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadLine(
            source,
            "encoding",
            f"not valid UTF-8 (byte {raw[e.start]:#x} at column {e.start + 1}); "
            "re-save the file as UTF-8",
        )
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        cut = (
            "" if raw.endswith(b"\n") else "; the last line looks cut off (was the file truncated?)"
        )
        return BadLine(source, "json", f"invalid JSON ({e.msg}){cut}")
    if isinstance(obj, list):  # a bare list of messages is a chat record
        obj = {"messages": obj}
    if not isinstance(obj, dict):
        return BadLine(
            source, "not-object", f"each line must be a JSON object, got {type(obj).__name__}"
        )
    return Record(obj, source)


class FormatGuard:
    """One file holds one format: the first record that has one sets it; another is an error."""

    def __init__(self, path: str | Path):
        self.path = path
        self.format: str | None = None
        self.first: str | None = None

    def mismatch(self, rec: Record) -> str | None:
        """The problem with ``rec``'s format (None if it fits the file, or has none at all)."""
        fmt = detect_format(rec.data)
        if fmt is None:
            return None
        if self.format is None:
            self.format, self.first = fmt, rec.source
            return None
        if fmt != self.format:
            return (
                f"{_a(fmt)} record in a file of {self.format} records (the first at "
                f"{self.first}); keep one format per file, or make them alike with "
                "`tuneforge data convert`"
            )
        return None


def read_stream(path: str | Path, one_format: bool = True) -> Iterator[Record]:
    """Records of a data file, streamed; the first unreadable line ends it with a one-line error.

    Args:
        path: the data file.
        one_format: also refuse a file that mixes formats (instruction, chat, preference, text).

    Raises:
        TuneforgeError: an unreadable line, mixed formats, or no records at all (after the last).
    """
    guard = FormatGuard(path)
    count = 0
    for item in scan(path):
        if isinstance(item, BadLine):
            raise item.error()
        if one_format and (problem := guard.mismatch(item)):
            raise item.error(problem)
        count += 1
        yield item
    if count == 0:
        raise TuneforgeError(f"{path}: no records (the file is empty)")


def count_records(path: str | Path) -> int:
    """How many records a file holds (a streaming pass that validates every line)."""
    return sum(1 for _ in read_stream(path))


def dumps(data: dict) -> str:
    """One JSONL line."""
    return json.dumps(data, ensure_ascii=False) + "\n"


@contextlib.contextmanager
def atomic_output(path: str | Path, inputs: tuple[str | Path, ...] = ()) -> Iterator[IO[str]]:
    """A text file (JSONL) that appears at ``path`` only if the block succeeds."""
    if Path(path).suffix.lower() != ".jsonl":
        raise TuneforgeError(f"{path}: outputs are JSONL; give the file a .jsonl name")
    with atomic_path(path, inputs) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        yield f


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"
