"""Turn raw records (instruction / chat) into a list of chat messages, validating as we go."""

from __future__ import annotations

from typing import Any

from tuneforge.data.io import Record

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


def detect_format(record: dict[str, Any]) -> str | None:
    """``instruction`` | ``chat`` | ``preference`` | ``text`` | None from the keys present."""
    if "messages" in record:
        return "chat"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    return None


def to_messages(rec: Record, fmt: str = "auto", system_prompt: str | None = None) -> Messages:
    """Validate one record and return its messages.

    Args:
        rec: the raw record with its source (file:line).
        fmt: ``auto``, ``instruction`` or ``chat``.
        system_prompt: added as a system message when the record has none.

    Raises:
        TuneforgeError: naming file, line and field.
    """
    kind = detect_format(rec.data) if fmt == "auto" else fmt
    if kind == "instruction":
        messages = _instruction(rec)
    elif kind == "chat":
        messages = _chat(rec)
    elif kind == "preference":
        raise rec.error(
            "a preference record (prompt/chosen/rejected) in supervised data; "
            "use instruction or chat records for training.objective sft"
        )
    elif kind == "text":
        raise rec.error(
            "a plain 'text' record; supervised fine-tuning needs instruction or chat records"
        )
    else:
        keys = ", ".join(sorted(map(str, rec.data))) or "none"
        raise rec.error(
            f"unknown record layout (keys: {keys}); use instruction records "
            "('instruction', optional 'input', 'output') or chat records ('messages')"
        )
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _text_field(rec: Record, key: str, required: bool, what: str) -> str | None:
    if key not in rec.data or rec.data[key] is None:
        if required:
            raise rec.error(f"'{key}' is missing ({what})")
        return None
    value = rec.data[key]
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise rec.error(f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise rec.error(f"'{key}' is empty ({what})")
    return value


def _instruction(rec: Record) -> Messages:
    what = "instruction records need 'instruction' and 'output'"
    instruction = _text_field(rec, "instruction", True, what)
    inp = _text_field(rec, "input", False, what)
    output = _text_field(rec, "output", True, what)
    prompt = instruction if not inp or not inp.strip() else f"{instruction}\n\n{inp}"
    messages = []
    system = _text_field(rec, "system", False, what)
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


def _chat(rec: Record) -> Messages:
    raw = rec.data.get("messages")
    if not isinstance(raw, list):
        raise rec.error(
            f"'messages' must be a list of {{role, content}} objects, got {type(raw).__name__}"
        )
    if not raw:
        raise rec.error("'messages' is empty")
    messages = []
    for i, m in enumerate(raw):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise rec.error(f"'{field}' must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise rec.error(f"'{field}.role' is missing")
        if role not in ROLES:
            raise rec.error(f"'{field}.role' is {role!r}; use system, user or assistant")
        if content is None:
            raise rec.error(f"'{field}.content' is missing")
        if not isinstance(content, str):
            raise rec.error(f"'{field}.content' must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise rec.error(f"'{field}' is a system message; only the first message may be one")
        if role == "assistant" and not content.strip():
            raise rec.error(f"'{field}.content' is empty (an assistant turn must say something)")
        messages.append({"role": role, "content": content})
    first = (
        next(m for m in messages if m["role"] != "system")
        if len(messages) > 1 or messages[0]["role"] != "system"
        else None
    )
    if first is not None and first["role"] != "user":
        raise rec.error(
            "the conversation must start with a user message (after an optional system one)"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise rec.error("'messages' has no assistant turn, so there is nothing to learn from")
    for prev, cur in zip(messages, messages[1:], strict=False):
        if prev["role"] == cur["role"]:
            raise rec.error(f"two '{cur['role']}' messages in a row; roles must alternate")
    return messages
