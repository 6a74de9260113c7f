"""Preference records: validation with one-line errors, shared prompt tokens, no silent cuts."""

import pytest

from tuneforge.cli import main
from tuneforge.config import DataConfig
from tuneforge.data.io import Record
from tuneforge.data.preference import (
    Preference,
    collate_pairs,
    prepare_preference_data,
    render_pair,
    to_preference,
)
from tuneforge.data.render import IGNORE, render_messages, render_prompt, render_reply
from tuneforge.errors import TuneforgeError

from ..conftest import write_jsonl

GOOD = {"prompt": "What is the capital of Peru?", "chosen": "Answer: Lima", "rejected": "Lima."}


def user(text):
    return [{"role": "user", "content": text}]


def test_pair_shares_the_inference_prompt_and_labels_only_the_responses(tokenizer):
    pref = Preference(user("What is 2 plus 2?"), "Answer: 4", "Sure! It is four.", "f:1")
    pair, reason = render_pair(tokenizer, pref, 256)
    assert reason == ""
    p = pair.prompt_length
    prompt = render_prompt(tokenizer, pref.prompt)
    assert pair.chosen.input_ids[:p] == pair.rejected.input_ids[:p] == prompt
    for sample, text in ((pair.chosen, "Answer: 4"), (pair.rejected, "Sure! It is four.")):
        assert sample.labels[:p] == [IGNORE] * p
        labelled = [x for x in sample.labels if x != IGNORE]
        assert tokenizer.decode(labelled) == text + "<|im_end|>"  # the model learns to stop
    # The same chat-template code as SFT: a single-turn reply renders exactly as render_messages.
    sft = render_messages(
        tokenizer, [*pref.prompt, {"role": "assistant", "content": "Answer: 4"}], 256
    )
    assert (sft.input_ids, sft.labels) == (pair.chosen.input_ids, pair.chosen.labels)


def test_message_prompts_label_only_the_final_reply(tokenizer):
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital of Chile?"},
    ]
    pref = to_preference(
        Record({"prompt": prompt, "chosen": "Santiago", "rejected": "Lima"}, "f:1")
    )
    pair, _ = render_pair(tokenizer, pref, 256)
    labelled = [x for x in pair.chosen.labels if x != IGNORE]
    assert tokenizer.decode(labelled) == "Santiago<|im_end|>"
    assert pair.chosen.input_ids[: pair.prompt_length] == render_prompt(tokenizer, prompt)


@pytest.mark.parametrize(
    "record, message",
    [
        ({**GOOD, "rejected": " Answer: Lima "}, "'chosen' and 'rejected' are identical"),
        ({k: v for k, v in GOOD.items() if k != "rejected"}, "'rejected' is missing"),
        ({k: v for k, v in GOOD.items() if k != "prompt"}, "'prompt' is missing"),
        ({**GOOD, "chosen": "  "}, "'chosen' is empty"),
        ({**GOOD, "prompt": 7}, "'prompt' must be text or a list"),
        ({**GOOD, "prompt": [{"role": "assistant", "content": "x"}]}, "must start with a user"),
    ],
)
def test_bad_records_get_one_line_with_file_line_field_and_exit_2(
    tmp_path, capsys, record, message
):
    train = write_jsonl(tmp_path / "prefs.jsonl", [GOOD, GOOD, record])
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "run"
    cfg.write_text(
        f"model: tiny-llama\noutput_dir: {out}\ndata:\n  train: {train}\n"
        "training:\n  objective: dpo\n  max_steps: 1\n  progress: false\n"
    )
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {train}:3: ") and message in err[0], err
    assert not out.exists()  # nothing written


def test_long_prompts_are_dropped_and_counted_never_cut(tokenizer, tmp_path):
    rows = [
        GOOD,
        {**GOOD, "prompt": "word " * 300},
        {**GOOD, "chosen": "Answer: Lima " + "x " * 80},
    ]
    train = write_jsonl(tmp_path / "p.jsonl", rows)
    data = prepare_preference_data(DataConfig(train=str(train), max_length=64), tokenizer, 0)
    s = data.train_stats
    assert (s.rendered, s.dropped_no_labels, s.truncated) == (2, 1, 1)
    assert s.dropped_sources == [f"{train}:2"]
    for pair in data.train:  # every kept pair still has a response token on both sides
        assert pair.chosen.supervised_token_count > 0 and pair.rejected.supervised_token_count > 0
        assert max(len(pair.chosen), len(pair.rejected)) <= 64
    only_long = write_jsonl(tmp_path / "q.jsonl", [rows[1]])
    with pytest.raises(TuneforgeError, match="no preference pair has a response token"):
        prepare_preference_data(DataConfig(train=str(only_long), max_length=64), tokenizer, 0)


def test_pairs_identical_once_cut_are_dropped(tokenizer):
    same_start = "Answer: " + "Lima " * 40
    pref = Preference(user("Capital of Peru?"), same_start + "yes", same_start + "no", "f:4")
    p = len(render_prompt(tokenizer, pref.prompt))
    assert render_pair(tokenizer, pref, p + 10) == (None, "identical")
    assert render_pair(tokenizer, pref, p) == (None, "prompt")  # no room for a response token
    pair, reason = render_pair(tokenizer, pref, 400)
    assert reason == "" and pair is not None


def test_collate_puts_chosen_rows_first_with_reference_logps(tokenizer):
    prefs = [
        Preference(user("a?"), "Answer: a", "aaa", "f:1"),
        Preference(user("b b b?"), "Answer: b", "b", "f:2"),
    ]
    pairs = [render_pair(tokenizer, p, 128)[0] for p in prefs]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert "reference_logps" not in batch
    rows = [pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]
    for i, s in enumerate(rows):
        assert batch["input_ids"][i, : len(s)].tolist() == s.input_ids
        assert batch["attention_mask"][i].sum() == len(s)
    pairs[0].reference_logps, pairs[1].reference_logps = (-1.0, -2.0), (-3.0, -4.0)
    assert collate_pairs(pairs, 0)["reference_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]


def test_reply_rendering_is_what_generation_sees(tokenizer):
    sample, p = render_reply(tokenizer, user("Hi"), "Hello there")
    assert sample.input_ids[:p] == render_prompt(tokenizer, user("Hi"))
    assert sample.labels[:p] == [IGNORE] * p and sample.supervised_token_count > 0
