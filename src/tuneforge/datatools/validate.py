"""``tuneforge data validate``: every problem of every record, with file:line and field.

A problem is ``unusable`` when training (or any data command) would refuse the record; the others
are warnings (an exact duplicate, identical chosen and rejected replies, an empty user turn).
Instruction and chat records are also run through ``records.to_messages``, the check ``train``
uses, so a file ``validate`` passes is a file ``train`` reads.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.data.fields import record_text
from tuneforge.data.io import Record
from tuneforge.data.records import ROLES, detect_format, to_messages
from tuneforge.datatools.lsh_index import KeySet, SourceList
from tuneforge.datatools.stream import BadLine, FormatGuard, scan
from tuneforge.errors import TuneforgeError

# kind -> unusable?
KINDS = {
    "encoding": True,
    "json": True,
    "not-object": True,
    "huge-line": True,
    "mixed-format": True,
    "unknown-layout": True,
    "missing": True,
    "type": True,
    "empty": True,
    "role": True,
    "order": True,
    "no-assistant": True,
    "duplicate": False,
    "identical-replies": False,
    "empty-user-turn": False,
}


@dataclass
class Problem:
    source: str  # file:line
    field: str  # '' for the whole line
    kind: str
    message: str

    @property
    def unusable(self) -> bool:
        return KINDS[self.kind]

    def __str__(self) -> str:
        where = f"{self.source}: {self.field}: " if self.field else f"{self.source}: "
        level = "" if self.unusable else "warning: "
        return f"{where}{level}{self.message}"


@dataclass
class ValidationReport:
    path: str
    format: str | None = None
    records: int = 0
    unusable_records: int = 0
    counts: Counter = field(default_factory=Counter)

    @property
    def usable(self) -> int:
        return self.records - self.unusable_records


def _text(data: dict, key: str, fld: str, required: bool) -> list[tuple[str, str, str]]:
    """(field, kind, message) problems of one text field."""
    if key not in data or data[key] is None:
        return [(fld, "missing", "is missing")] if required else []
    value = data[key]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return []  # numbers are read as text
    if not isinstance(value, str):
        return [(fld, "type", f"must be a string, got {type(value).__name__}")]
    if required and not value.strip():
        return [(fld, "empty", "is empty")]
    return []


def _messages(
    value: Any, fld: str, *, needs_assistant: bool, ends_with_user: bool = False
) -> list[tuple[str, str, str]]:
    if not isinstance(value, list):
        return [(fld, "type", f"must be a list of {{role, content}}, got {type(value).__name__}")]
    if not value:
        return [(fld, "empty", "has no messages")]
    out = []
    roles = []
    for i, m in enumerate(value):
        f = f"{fld}[{i}]"
        if not isinstance(m, dict):
            out.append((f, "type", "must be an object with 'role' and 'content'"))
            continue
        role, content = m.get("role"), m.get("content")
        if role is None:
            out.append((f"{f}.role", "missing", "is missing"))
        elif role not in ROLES:
            out.append((f"{f}.role", "role", f"is {role!r}; use system, user or assistant"))
        if content is None:
            out.append((f"{f}.content", "missing", "is missing"))
        elif not isinstance(content, str):
            out.append((f"{f}.content", "type", f"must be a string, got {type(content).__name__}"))
        elif not content.strip():
            if role == "assistant":
                out.append(
                    (f"{f}.content", "empty", "is empty (an assistant turn must say something)")
                )
            elif role == "user":
                out.append((f"{f}.content", "empty-user-turn", "is an empty user turn"))
        if role == "system" and i != 0:
            out.append((f, "order", "is a system message; only the first message may be one"))
        roles.append(role)
    body = [r for r in roles if r != "system"]
    if body and body[0] != "user" and body[0] in ROLES:
        out.append((fld, "order", "must start with a user message (after an optional system one)"))
    for i, (a, b) in enumerate(zip(roles, roles[1:], strict=False)):
        if a == b and a in ("user", "assistant"):
            out.append((f"{fld}[{i + 1}]", "order", f"two '{a}' messages in a row"))
    if needs_assistant and "assistant" not in roles:
        out.append((fld, "no-assistant", "has no assistant turn, so there is nothing to learn"))
    if ends_with_user and body and body[-1] != "user":
        out.append((fld, "order", "a preference prompt must end with a user turn"))
    return out


def _reply(data: dict, key: str) -> list[tuple[str, str, str]]:
    value = data.get(key)
    if isinstance(value, list | dict):
        turns = value if isinstance(value, list) else [value]
        if not turns:
            return [(key, "empty", "is empty")]
        out = []
        for i, m in enumerate(turns):
            if not isinstance(m, dict) or m.get("role") != "assistant":
                out.append((f"{key}[{i}]", "role", "must be an assistant message"))
            elif not isinstance(m.get("content"), str) or not m["content"].strip():
                out.append((f"{key}[{i}].content", "empty", "is empty"))
        return out
    return _text(data, key, key, True)


def check_record(data: dict, fmt: str | None) -> list[tuple[str, str, str]]:
    """(field, kind, message) for each problem of one record of format ``fmt``."""
    if fmt == "instruction":
        return (
            _text(data, "instruction", "instruction", True)
            + _text(data, "input", "input", False)
            + _text(data, "output", "output", True)
            + _text(data, "system", "system", False)
        )
    if fmt == "chat":
        return _messages(data.get("messages"), "messages", needs_assistant=True)
    if fmt == "preference":
        out = []
        prompt = data.get("prompt")
        if isinstance(prompt, list):
            out += _messages(prompt, "prompt", needs_assistant=False, ends_with_user=True)
        else:
            out += _text(data, "prompt", "prompt", True)
        out += _reply(data, "chosen") + _reply(data, "rejected")
        if not out and data.get("chosen") == data.get("rejected"):
            out.append(("rejected", "identical-replies", "is identical to 'chosen'"))
        return out
    if fmt == "text":
        return _text(data, "text", "text", True)
    keys = ", ".join(sorted(map(str, data))) or "none"
    return [
        (
            "",
            "unknown-layout",
            f"unknown record layout (keys: {keys}); use instruction, chat ('messages'), "
            "preference ('prompt', 'chosen', 'rejected') or text records, or "
            "`tuneforge data convert`",
        )
    ]


def record_problems(rec: Record, fmt: str | None) -> list[Problem]:
    """Problems of one record; train's own check backs the field checks up."""
    problems = [Problem(rec.source, f, k, m) for f, k, m in check_record(rec.data, fmt)]
    if fmt in ("instruction", "chat") and not any(p.unusable for p in problems):
        try:
            to_messages(rec, fmt)
        except TuneforgeError as e:  # a rule only train knows; keep its wording
            message = str(e).removeprefix(f"{rec.source}: ")
            problems.append(Problem(rec.source, "", "order", message))
    return problems


def iter_problems(path: str | Path, report: ValidationReport) -> Iterator[Problem]:
    """Every problem in a file in line order; ``report`` is filled in as they go.

    Raises:
        TuneforgeError: the file is missing, binary, or holds no records.
    """
    guard = FormatGuard(path)
    # hash -> first source, in temporary files: memory stays flat however long the file
    seen, sources = KeySet(), SourceList()
    try:
        for item in scan(path):
            report.records += 1  # a line that should have been a record counts as one
            if isinstance(item, BadLine):
                found = [Problem(item.source, "", item.kind, item.message)]
            else:
                mixed = guard.mismatch(item)
                fmt = detect_format(item.data)
                if mixed:
                    found = [Problem(item.source, "", "mixed-format", mixed)]
                else:
                    found = record_problems(item, fmt)
                    text = record_text(item.data, fmt).encode()
                    key = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest())
                    first = seen.find(key)
                    if first >= 0:
                        found.append(
                            Problem(
                                item.source, "", "duplicate", f"the same record as {sources[first]}"
                            )
                        )
                    else:
                        seen.add(key)
                        sources.append(item.source)
            if isinstance(item, BadLine) or any(p.unusable for p in found):
                report.unusable_records += 1
            for p in found:
                report.counts[p.kind] += 1
                yield p
    finally:
        seen.close()
        sources.close()
    report.format = guard.format
    if report.records == 0:
        raise TuneforgeError(f"{path}: no records (the file is empty)")


def validate_file(path: str | Path) -> tuple[ValidationReport, list[Problem]]:
    """Validate a whole file; returns the report and every problem (for the Python API)."""
    report = ValidationReport(str(path))
    problems = list(iter_problems(path, report))
    return report, problems
