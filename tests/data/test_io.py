"""Reading data files and the one-line errors for bad records."""

import json

import pytest

from tuneforge.data.dataset import load_conversations
from tuneforge.errors import TuneforgeError


def test_formats_read_to_the_same_messages(tmp_path):
    rows = [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Hi", "output": "Hello"},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("instruction,input,output\nAdd,1 2,3\nHi,,Hello\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    results = [
        load_conversations(str(tmp_path / f"a.{ext}"))[0]
        for ext in ("jsonl", "json", "csv", "parquet")
    ]
    assert all(r == results[0] for r in results)
    assert results[0][0] == [
        {"role": "user", "content": "Add\n\n1 2"},
        {"role": "assistant", "content": "3"},
    ]


def test_chat_records_and_bare_lists(tmp_path):
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"messages": chat}) + "\n" + json.dumps(chat) + "\n"
    )
    convs, sources = load_conversations(str(tmp_path / "c.jsonl"))
    assert convs == [chat, chat] and sources[1].endswith("c.jsonl:2")


@pytest.mark.parametrize(
    "line, message",
    [
        (
            {"instruction": "x"},
            "'output' is missing (instruction records need 'instruction' and 'output')",
        ),
        ({"instruction": "x", "output": ""}, "'output' is empty"),
        (
            {"instruction": "x", "output": 3.5j if False else ["a"]},
            "'output' must be a string, got list",
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, "'messages' has no assistant turn"),
        (
            {"messages": [{"role": "bot", "content": "a"}]},
            "'messages[0].role' is 'bot'; use system, user or assistant",
        ),
        ({"messages": [{"role": "user"}]}, "'messages[0].content' is missing"),
        ({"foo": 1}, "unknown record layout (keys: foo)"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "a preference record"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, line, message):
    p = tmp_path / "train.jsonl"
    p.write_text(json.dumps({"instruction": "ok", "output": "ok"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(TuneforgeError) as e:
        load_conversations(str(p))
    assert str(e.value).startswith(f"{p}:2: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "no records (the file is empty)"),
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "outp', ":2: invalid JSON"),
        (b"\xff\xfe\x00\x01binary\x00", "looks like a binary file"),
        (b'{"instruction": "caf\xe9", "output": "b"}\n', ":1: not valid UTF-8"),
        (b"5\n", ":1: each line must be a JSON object"),
    ],
)
def test_bad_files(tmp_path, content, message):
    p = tmp_path / "train.jsonl"
    p.write_bytes(content)
    with pytest.raises(TuneforgeError, match=None) as e:
        load_conversations(str(p))
    assert message in str(e.value)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(TuneforgeError, match="data file not found"):
        load_conversations(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(TuneforgeError, match="unknown data format '.txt'"):
        load_conversations(str(tmp_path / "x.txt"))
