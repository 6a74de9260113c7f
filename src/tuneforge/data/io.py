"""Read records from JSONL / JSON / CSV / Parquet, keeping where each came from (file:line)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Record:
    """One raw record and where it was read from."""

    data: dict[str, Any]
    source: str  # e.g. "data/train.jsonl:17" (JSONL/CSV: line; JSON/Parquet: record number)

    def error(self, message: str) -> TuneforgeError:
        return TuneforgeError(f"{self.source}: {message}")


def read_records(path: str | Path) -> list[Record]:
    """Read every record of a data file.

    Raises:
        TuneforgeError: missing file, unknown suffix, undecodable text, malformed line, empty file.
    """
    path = Path(path)
    if not path.exists():
        raise TuneforgeError(f"{path}: data file not found")
    if path.is_dir():
        raise TuneforgeError(f"{path}: is a folder; give a .jsonl, .json, .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TuneforgeError(
            f"{path}: unknown data format '{suffix or '(none)'}'; use .jsonl, .json, .csv or .parquet"
        )
    if suffix == ".parquet":
        records = _read_parquet(path)
    else:
        text = _read_text(path)
        if suffix == ".jsonl":
            records = _read_jsonl(path, text)
        elif suffix == ".json":
            records = _read_json(path, text)
        else:
            records = _read_csv(path, text)
    if not records:
        raise TuneforgeError(f"{path}: no records (the file is empty)")
    return records


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise TuneforgeError(f"{path}: looks like a binary file, not text data")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TuneforgeError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#x}); re-save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    lines = text.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ""
            if i == len(lines) and not text.endswith("\n"):
                hint = " (the last line looks cut off)"
            elif len(line) > 1_000_000:
                hint = f" (a {len(line) / 1e6:.1f} MB line)"
            raise TuneforgeError(f"{path}:{i}: invalid JSON ({e.msg}){hint}") from None
        if isinstance(obj, list):  # a bare list of messages is a chat record
            obj = {"messages": obj}
        if not isinstance(obj, dict):
            raise TuneforgeError(
                f"{path}:{i}: each line must be a JSON object, got {type(obj).__name__}"
            )
        records.append(Record(obj, f"{path}:{i}"))
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TuneforgeError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(obj, dict):
        # {"data": [...]} or a single record
        lists = [v for v in obj.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        obj = lists[0] if len(obj) == 1 and lists else [obj]
    if not isinstance(obj, list):
        raise TuneforgeError(f"{path}:1: a .json data file must hold a list of records")
    records = []
    for i, item in enumerate(obj, 1):
        if isinstance(item, list):
            item = {"messages": item}
        if not isinstance(item, dict):
            raise TuneforgeError(
                f"{path}: record {i}: must be a JSON object, got {type(item).__name__}"
            )
        records.append(Record(item, f"{path}: record {i}"))
    return records


def _read_csv(path: Path, text: str) -> list[Record]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        return []
    records = []
    for row in reader:
        line = reader.line_num
        if None in row:
            raise TuneforgeError(f"{path}:{line}: more values than header columns")
        data = {k: _maybe_json(v) for k, v in row.items() if k is not None and v not in (None, "")}
        records.append(Record(data, f"{path}:{line}"))
    return records


def _maybe_json(value: str) -> Any:
    """CSV cells holding JSON lists (messages) are decoded; anything else stays text."""
    s = value.strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises many types for a bad file
        raise TuneforgeError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    rows = table.to_pylist()
    return [
        Record({k: v for k, v in row.items() if v is not None}, f"{path}: row {i}")
        for i, row in enumerate(rows, 1)
    ]
