"""data.augment: noise and paraphrase variants, tags, outputs untouched, kept out of eval."""

import random

import pytest

from tuneforge.data.io import Record
from tuneforge.datatools.augment import (
    AugmentOptions,
    AugmentReport,
    Paraphraser,
    accept_paraphrase,
    augment_records,
    noise_text,
    origin_key,
)


def records(rows):
    return [Record(r, f"d.jsonl:{i + 1}") for i, r in enumerate(rows)]


ROWS = [
    {
        "instruction": "Convert this date to ISO 8601 format please and be careful",
        "input": "May 4th 1999",
        "output": "1999-05-04",
        "id": i,
    }
    for i in range(6)
] + [
    {
        "messages": [
            {"role": "system", "content": "Be nice to the user at all times"},
            {"role": "user", "content": "Tell me the capital city of the country France"},
            {"role": "assistant", "content": "Paris"},
        ]
    }
]


def test_noise_keeps_digits_and_lines_and_is_seeded():
    text = "Convert the 3 dates below into ISO format now\nline two stays a line"
    a = noise_text(text, random.Random(1), p=0.4)
    assert a == noise_text(text, random.Random(1), p=0.4) and a != text
    assert a.count("\n") == 1 and "3" in a.split()
    words = [w for line in a.split("\n") for w in line.split(" ")]
    assert set(words) <= set(text.split())  # dropout and swaps only: no new words


def test_noise_variants_touch_only_the_request():
    rep = AugmentReport()
    out = list(
        augment_records(records(ROWS[:1] + ROWS[-1:]), AugmentOptions(3, "noise", 0.3), None, rep)
    )
    assert len(out) == 6 and rep.variants == {"noise": 4}
    original, variants = out[0], out[1:3]
    for v in variants:
        assert v["augmented"] is True and v["augmentation"] == "noise"
        assert v["augmented_from"] == "d.jsonl:1" and v["augmented_origin"] == origin_key(original)
        assert (v["input"], v["output"], v["id"]) == ("May 4th 1999", "1999-05-04", 0)
        assert v["instruction"] != original["instruction"]
    assert variants[0]["instruction"] != variants[1]["instruction"]
    chat, chat_variants = out[3], out[4:]
    for v in chat_variants:
        assert v["messages"][0] == chat["messages"][0] and v["messages"][2] == chat["messages"][2]
        assert v["messages"][1]["content"] != chat["messages"][1]["content"]
    # the origin key survives `clean` of the original
    assert origin_key({**original, "instruction": " " + original["instruction"] + "\u200b"}) == (
        origin_key(original)
    )


def test_accept_paraphrase():
    orig = "Convert this date to ISO 8601 format."
    assert accept_paraphrase(orig, "Rewrite this date in ISO 8601 form.", "1999-05-04") == (
        True,
        "",
    )
    assert accept_paraphrase(orig, "convert this date to ISO 8601 format.", "x")[1] == "unchanged"
    assert accept_paraphrase(orig, "The answer is 1999-05-04 in ISO.", "1999-05-04")[1] == (
        "contains the expected output"
    )
    assert (
        accept_paraphrase(orig, "Bananas are yellow fruit.", "x")[1] == "drifted from the original"
    )
    assert accept_paraphrase(orig, "Convert date\n\nto ISO", "x")[1] == "adds lines"
    assert accept_paraphrase(orig, "", "x")[1] == "empty"
    assert accept_paraphrase(orig, "YYYY-MM-DD.", "x")[1] == "too short"


def test_paraphrase_path_with_a_model():
    """The paraphrase path end to end with the tiny random model: its text is noise, so only the
    structure is checked (one variant per record, tags, outputs untouched, rejects counted)."""
    from tuneforge.models import load_model

    model, tokenizer, _ = load_model("tiny-llama", device="cpu")
    para = Paraphraser(model, tokenizer, seed=0, max_new_tokens=12)
    rep = AugmentReport()
    out = list(augment_records(records(ROWS), AugmentOptions(2, "paraphrase", 0.2), para, rep))
    assert len(out) == 14 and para.calls == 1
    originals, variants = out[0::2], out[1::2]
    assert originals == ROWS
    assert all(v["augmented"] and v["augmentation"] in ("paraphrase", "noise") for v in variants)
    # every paraphrase was either accepted or rejected and replaced by noise
    assert rep.variants["paraphrase"] + sum(rep.rejected.values()) == 7
    assert rep.variants["paraphrase"] + rep.variants["noise"] == 7
    for o, v in zip(originals[:6], variants[:6], strict=True):
        assert (v["input"], v["output"]) == (o["input"], o["output"])
    assert variants[6]["messages"][2] == ROWS[6]["messages"][2]


def test_bad_options():
    from tuneforge.errors import TuneforgeError

    with pytest.raises(TuneforgeError, match="--factor must be at least 2"):
        list(augment_records(records(ROWS), AugmentOptions(1, "noise")))
    with pytest.raises(TuneforgeError, match="paraphrasing needs a model"):
        list(augment_records(records(ROWS), AugmentOptions(2, "both")))
