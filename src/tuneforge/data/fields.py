"""Where the text lives in each record format: prompt, response, every content string.

The data tools (clean, dedup, contamination, stats, augment) work on raw records of any of the four
formats and write them back in the same layout, so they need these views rather than messages:

- instruction: ``{"instruction", "input"?, "output", "system"?}``
- chat: ``{"messages": [{"role", "content"}, ...]}``
- preference: ``{"prompt": text | messages, "chosen": text | messages, "rejected": ...}``
- text: ``{"text"}``

The helpers are total: a field of the wrong type is turned into text (JSON) rather than raising, so
they can run on records that ``validate`` would reject.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

FORMATS = ("instruction", "chat", "preference", "text")
SEP = "\x1f"  # joins fields in a record's canonical text, so field boundaries matter


def as_text(value: Any) -> str:
    """A field value as text: strings as they are, None as '', anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _turns(value: Any, role: str | None) -> list[str]:
    """Contents of message turns (of ``role``, or all) in a messages list; a string is one turn."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [as_text(value)] if value is not None else []
    out = []
    for m in value:
        if isinstance(m, dict):
            if role is None or m.get("role") == role:
                out.append(as_text(m.get("content")))
        else:
            out.append(as_text(m))
    return out


def prompt_text(data: dict, fmt: str) -> str:
    """What the model is asked: instruction + input, the user turns, the preference prompt, or the
    text itself. Contamination checks compare this."""
    if fmt == "instruction":
        parts = [as_text(data.get("instruction")), as_text(data.get("input"))]
        return "\n\n".join(p for p in parts if p.strip())
    if fmt == "chat":
        return "\n".join(_turns(data.get("messages"), "user"))
    if fmt == "preference":
        return "\n".join(_turns(data.get("prompt"), "user"))
    return as_text(data.get("text"))


def response_text(data: dict, fmt: str) -> str:
    """What the model should answer: output, the assistant turns, or the chosen reply."""
    if fmt == "instruction":
        return as_text(data.get("output"))
    if fmt == "chat":
        return "\n".join(_turns(data.get("messages"), "assistant"))
    if fmt == "preference":
        return "\n".join(_turns(data.get("chosen"), None))
    return ""


def record_text(data: dict, fmt: str | None) -> str:
    """Every content field of a record, in a fixed order (what deduplication compares)."""
    if fmt == "instruction":
        keys = ("system", "instruction", "input", "output")
        return SEP.join(as_text(data.get(k)) for k in keys)
    if fmt == "chat":
        msgs = data.get("messages")
        if isinstance(msgs, list):
            return SEP.join(
                f"{as_text(m.get('role'))}: {as_text(m.get('content'))}"
                if isinstance(m, dict)
                else as_text(m)
                for m in msgs
            )
        return as_text(msgs)
    if fmt == "preference":
        return SEP.join(
            "\n".join(_turns(data.get(k), None)) for k in ("prompt", "chosen", "rejected")
        )
    if fmt == "text":
        return as_text(data.get("text"))
    return json.dumps(data, ensure_ascii=False, sort_keys=True)


def _map_turns(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return {**value, "content": fn(value["content"])}
    if isinstance(value, list):
        return [_map_turns(m, fn) if isinstance(m, dict) else m for m in value]
    return value


def map_texts(data: dict, fmt: str, fn: Callable[[str], str]) -> dict:
    """A copy of ``data`` with ``fn`` applied to every content string (other keys untouched)."""
    out = dict(data)
    if fmt == "instruction":
        for key in ("instruction", "input", "output", "system"):
            if isinstance(out.get(key), str):
                out[key] = fn(out[key])
    elif fmt == "chat":
        out["messages"] = _map_turns(out.get("messages"), fn)
    elif fmt == "preference":
        for key in ("prompt", "chosen", "rejected"):
            if key in out:
                out[key] = _map_turns(out[key], fn)
    elif fmt == "text" and isinstance(out.get("text"), str):
        out["text"] = fn(out["text"])
    return out


def response_texts(data: dict, fmt: str) -> list[tuple[str, str]]:
    """(field, text) of every expected output, for the empty / too-short checks."""
    if fmt == "instruction":
        return [("output", as_text(data.get("output")))]
    if fmt == "chat":
        msgs = data.get("messages")
        if not isinstance(msgs, list):
            return []
        return [
            (f"messages[{i}].content", as_text(m.get("content")))
            for i, m in enumerate(msgs)
            if isinstance(m, dict) and m.get("role") == "assistant"
        ]
    if fmt == "preference":
        return [(k, "\n".join(_turns(data.get(k), None))) for k in ("chosen", "rejected")]
    return [("text", as_text(data.get("text")))]


def user_slots(data: dict, fmt: str) -> list[tuple[Any, ...]]:
    """Paths of the texts augmentation may rewrite: the instruction (never ``input``, which holds
    the values the answer depends on) or the user turns; never an expected output."""
    if fmt == "instruction":
        return [("instruction",)] if isinstance(data.get("instruction"), str) else []
    if fmt == "chat":
        key, msgs = "messages", data.get("messages")
    elif fmt == "preference":
        key, msgs = "prompt", data.get("prompt")
        if isinstance(msgs, str):
            return [("prompt",)]
    else:
        return []
    if not isinstance(msgs, list):
        return []
    return [
        (key, i, "content")
        for i, m in enumerate(msgs)
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
    ]


def get_path(data: dict, path: tuple[Any, ...]) -> Any:
    for p in path:
        data = data[p]
    return data


def with_paths(data: dict, values: dict[tuple[Any, ...], str]) -> dict:
    """A deep copy of ``data`` with each path set to its new value."""
    out = copy.deepcopy(data)
    for path, value in values.items():
        node = out
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return out


def dotted(data: dict, field: str) -> Any:
    """``data['a']['b']`` for ``'a.b'``; KeyError if absent."""
    node: Any = data
    for part in field.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(field)
        node = node[part]
    return node
