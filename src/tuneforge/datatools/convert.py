"""``tuneforge data convert``: the layouts users already have -> our instruction or chat records.

Layouts read:

- ``alpaca``: ``{"instruction", "input"?, "output", "system"?}`` (its rendered ``text`` column,
  if present, is dropped: it repeats the record in one prompt format);
- ``prompt-completion``: ``{"prompt", "completion"}`` (OpenAI's legacy fine-tuning layout);
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}``;
- ``openai``: ``{"messages": [{"role", "content"}]}`` with ``developer`` as system and content as
  a string or a list of text parts (our chat layout is the plain case of it).

Other top-level keys (ids, categories) are kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.data.io import Record
from tuneforge.datatools.stream import atomic_output, dumps, read_stream
from tuneforge.errors import TuneforgeError

LAYOUTS = ("alpaca", "prompt-completion", "sharegpt", "openai")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def detect_layout(data: dict) -> str | None:
    """Which known layout a record is in (None: none of them)."""
    if "conversations" in data:
        return "sharegpt"
    if "messages" in data:
        return "openai"
    if "instruction" in data or "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data and "chosen" not in data:
        return "prompt-completion"
    return None


def _text(rec: Record, value, field: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise rec.error(f"'{field}' must be a string, got {type(value).__name__}")
    return value


def _openai_content(rec: Record, content, field: str) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise rec.error(f"'{field}[{j}]' is {_a(str(kind))} part; only text parts convert")
            parts.append(_text(rec, part.get("text"), f"{field}[{j}].text"))
        return "\n".join(parts)
    if content is None:
        raise rec.error(f"'{field}' is missing (tool calls have no place in chat records)")
    return _text(rec, content, field)


def _messages(rec: Record, layout: str) -> tuple[list[dict], set[str]]:
    """(messages, top-level keys consumed) of a record in a chat-like layout."""
    if layout == "sharegpt":
        turns, key, rkey, ckey, roles = (
            rec.data.get("conversations"),
            "conversations",
            "from",
            "value",
            SHAREGPT_ROLES,
        )
    else:
        turns, key, rkey, ckey, roles = (
            rec.data.get("messages"),
            "messages",
            "role",
            "content",
            OPENAI_ROLES,
        )
    if not isinstance(turns, list) or not turns:
        raise rec.error(f"'{key}' must be a non-empty list of turns")
    messages = []
    system = rec.data.get("system") if layout == "sharegpt" else None
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        f = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise rec.error(f"'{f}' must be an object with '{rkey}' and '{ckey}'")
        who = turn.get(rkey)
        if who not in roles:
            raise rec.error(
                f"'{f}.{rkey}' is {who!r}; chat records hold {', '.join(sorted(set(roles)))} turns"
            )
        if layout == "openai":
            content = _openai_content(rec, turn.get(ckey), f"{f}.{ckey}")
        else:
            content = _text(rec, turn.get(ckey), f"{f}.{ckey}")
        messages.append({"role": roles[who], "content": content})
    return messages, {key, "system"} if layout == "sharegpt" else {key}


def _instruction_parts(rec: Record, layout: str) -> tuple[dict, set[str]]:
    """{instruction, input?, output, system?} and the keys consumed, from alpaca or prompt-completion."""
    d = rec.data
    if layout == "prompt-completion":
        return {
            "instruction": _text(rec, d.get("prompt"), "prompt"),
            "output": _text(rec, d.get("completion"), "completion"),
        }, {"prompt", "completion"}
    for key in ("instruction", "output"):
        if d.get(key) is None:
            raise rec.error(f"'{key}' is missing (alpaca records need 'instruction' and 'output')")
    out = {"instruction": _text(rec, d["instruction"], "instruction")}
    if d.get("input") not in (None, ""):
        out["input"] = _text(rec, d["input"], "input")
    out["output"] = _text(rec, d["output"], "output")
    if d.get("system") not in (None, ""):
        out["system"] = _text(rec, d["system"], "system")
    return out, {"instruction", "input", "output", "system", "text"}


def instruction_to_chat(data: dict) -> dict:
    """An instruction record as a chat record (the same messages ``train`` renders)."""
    prompt = data["instruction"]
    if data.get("input") not in (None, "") and str(data["input"]).strip():
        prompt = f"{prompt}\n\n{data['input']}"
    messages = [{"role": "system", "content": data["system"]}] if data.get("system") else []
    messages += [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": data["output"]},
    ]
    rest = {k: v for k, v in data.items() if k not in ("instruction", "input", "output", "system")}
    return {"messages": messages, **rest}


def convert_record(rec: Record, to: str, layout: str) -> dict:
    """One record of ``layout`` as our ``to`` format (chat | instruction).

    Raises:
        TuneforgeError: naming the record and field that cannot be converted.
    """
    if layout in ("alpaca", "prompt-completion"):
        parts, used = _instruction_parts(rec, layout)
        rest = {k: v for k, v in rec.data.items() if k not in used}
        if to == "instruction":
            return {**parts, **rest}
        return {**instruction_to_chat(parts), **rest}
    messages, used = _messages(rec, layout)
    rest = {k: v for k, v in rec.data.items() if k not in used}
    if to == "chat":
        return {"messages": messages, **rest}
    system = [m["content"] for m in messages if m["role"] == "system"]
    body = [m for m in messages if m["role"] != "system"]
    if len(system) > 1 or messages[0]["role"] != "system" and system:
        raise rec.error(
            "a system message after the first turn has no place in an instruction record"
        )
    if [m["role"] for m in body] != ["user", "assistant"]:
        exchanges = sum(1 for m in body if m["role"] == "user")
        raise rec.error(
            f"has {exchanges} user turn(s) and {len(body) - exchanges} assistant turn(s); an "
            "instruction record holds exactly one exchange (use --to chat)"
        )
    out = {"instruction": body[0]["content"], "output": body[1]["content"]}
    if system:
        out["system"] = system[0]
    return {**out, **rest}


@dataclass
class ConvertReport:
    records: int = 0
    layouts: Counter = field(default_factory=Counter)


def convert_records(
    records: Iterable[Record], to: str, layout: str = "auto", report: ConvertReport | None = None
) -> Iterator[dict]:
    """Converted records in order; the first record fixes the layout unless ``layout`` is given."""
    if to not in ("chat", "instruction"):
        raise TuneforgeError(f"--to must be chat or instruction, got {to!r}")
    fixed, first = (None, None) if layout == "auto" else (layout, None)
    for rec in records:
        found = detect_layout(rec.data)
        if found is None:
            raise rec.error(
                "not a layout convert knows (alpaca, prompt-completion, sharegpt, openai); keys: "
                + (", ".join(sorted(map(str, rec.data))) or "none")
            )
        if fixed is None:
            fixed, first = found, rec.source
        elif found != fixed:
            where = f" (the first at {first})" if first else ""
            raise rec.error(
                f"{_a(found)} record in a file of {fixed} records{where}; keep one layout per file"
            )
        if report is not None:
            report.records += 1
            report.layouts[found] += 1
        yield convert_record(rec, to, found)


def convert_file(path: str | Path, out: str | Path, to: str, layout: str = "auto") -> ConvertReport:
    """Stream ``path`` into ``out`` as ``to`` records (written only on success)."""
    report = ConvertReport()
    with atomic_output(out, inputs=(path,)) as f:
        for data in convert_records(read_stream(path, one_format=False), to, layout, report):
            f.write(dumps(data))
    return report


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"
