"""data.convert: alpaca / prompt-completion / ShareGPT / OpenAI layouts -> ours, and back."""

import json

import pytest

from tuneforge.data.io import Record
from tuneforge.data.records import to_messages
from tuneforge.datatools.convert import convert_file, convert_records
from tuneforge.errors import TuneforgeError

from ..conftest import write_jsonl

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def convert(rows: list[dict], to: str, layout: str = "auto") -> list[dict]:
    return list(convert_records([Record(r, f"f:{i + 1}") for i, r in enumerate(rows)], to, layout))


def test_sharegpt_and_openai_give_the_same_chat_records():
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {
        "id": "c1",
        "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATION],
    }
    sharegpt_top_system = {
        "id": "c1",
        "system": "Be brief.",
        "conversations": sharegpt["conversations"][1:],
    }
    openai = {
        "id": "c1",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
            {"role": "assistant", "content": "Paris.", "weight": 1},
            *CONVERSATION[3:],
        ],
    }
    expected = {"messages": CONVERSATION, "id": "c1"}
    assert convert([sharegpt], "chat") == [expected]
    assert convert([sharegpt_top_system], "chat") == [expected]
    assert convert([openai], "chat") == [expected]
    # and train reads the result as the same messages
    assert to_messages(Record(expected, "x")) == CONVERSATION


def test_round_trips():
    single = [
        {"instruction": "Add 2 and 3.", "output": "5", "system": "You do sums.", "id": 7},
        {"instruction": "Say hi.", "output": "hi"},
    ]
    chat = convert(single, "chat")
    assert chat[1] == {
        "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    }
    assert convert(chat, "instruction") == single
    chats = [{"messages": CONVERSATION[:3], "tag": "x"}]
    assert convert(convert(chats, "instruction"), "chat") == chats
    # the instruction -> chat rendering is the one train uses
    rec = {"instruction": "Add", "input": "2 3", "output": "5"}
    assert convert([rec], "chat")[0]["messages"] == to_messages(Record(rec, "x"))


def test_alpaca_and_prompt_completion():
    alpaca = {
        "instruction": "Add",
        "input": "2 3",
        "output": "5",
        "text": "### Instruction: Add...",
    }
    assert convert([alpaca], "instruction") == [
        {"instruction": "Add", "input": "2 3", "output": "5"}
    ]
    pc = {"prompt": "2+2=", "completion": "4"}
    assert convert([pc], "instruction") == [{"instruction": "2+2=", "output": "4"}]
    assert convert([pc], "chat")[0]["messages"][1] == {"role": "assistant", "content": "4"}


@pytest.mark.parametrize(
    "row, to, message",
    [
        ({"messages": CONVERSATION}, "instruction", "f:1: has 2 user turn(s) and 2 assistant"),
        (
            {
                "conversations": [
                    {"from": "human", "value": "x"},
                    {"from": "function_call", "value": "y"},
                ]
            },
            "chat",
            "f:1: 'conversations[1].from' is 'function_call'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "chat",
            "f:1: 'messages[0].content[0]' is an image_url part",
        ),
        ({"question": "x"}, "chat", "f:1: not a layout convert knows"),
    ],
)
def test_errors_name_line_and_field(row, to, message):
    with pytest.raises(TuneforgeError) as e:
        convert([row], to)
    assert str(e.value).startswith(message)


def test_convert_file_refuses_mixed_layouts_and_writes_nothing(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"instruction": "a", "output": "b"}, {"conversations": [{"from": "human", "value": "x"}]}],
    )
    with pytest.raises(TuneforgeError, match="in.jsonl:2: a sharegpt record in a file of alpaca"):
        convert_file(src, tmp_path / "out.jsonl", "chat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    rep = convert_file(
        write_jsonl(tmp_path / "ok.jsonl", [{"instruction": "a", "output": "b"}] * 3),
        tmp_path / "out.jsonl",
        "chat",
    )
    assert rep.records == 3 and len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])["messages"][0] == {
        "role": "user",
        "content": "a",
    }
