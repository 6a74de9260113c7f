"""The data steps `train` applies from the config: data.clean, data.dedup, data.mix, data.augment,
and the one-line warning when eval prompts are in the training data."""

import pytest

from tuneforge.config import DataConfig, load_config
from tuneforge.data.pipeline import prepare_conversations
from tuneforge.errors import TuneforgeError

from ..conftest import tiny_config, write_jsonl

ROWS = [
    {"instruction": f"Write the number {i} in words", "output": f"number {i}"} for i in range(10)
]


def test_train_cleans_dedups_and_warns_about_contaminated_eval(tmp_path, capsys):
    from tuneforge.train import train

    train_rows = ROWS + [
        {"instruction": "WRITE the number 2 in words", "output": "number  2"},  # exact dup of :3
        {"instruction": "Nothing", "output": "\u200b\x07"},  # empty after cleaning
    ]
    tr = write_jsonl(tmp_path / "train.jsonl", train_rows)
    ev = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            {"instruction": "Spell 42", "output": "forty-two"},
            {"instruction": "Write the number 4 in words", "output": "four"},  # in train
            {"instruction": "Spell 7", "output": "seven"},
            {"instruction": "Spell 8", "output": "eight"},
        ],
    )
    cfg = tiny_config(
        tmp_path, tr, ev, **{"data.clean": "true", "data.dedup": "true", "training.max_steps": 1}
    )
    summary = train(cfg)
    err = capsys.readouterr().err.splitlines()
    assert summary["train_samples"] == 10 and summary["eval_samples"] == 4
    assert (
        f"data.clean: {tr}: kept 11 of 12 records (0 normalised), dropped 1 empty-output; e.g. {tr}:12: output is empty after cleaning"
        in err
    )
    assert (
        f"data.dedup: {tr}: dropped 1 exact and 0 near duplicates of 11 records; e.g. {tr}:11 repeats {tr}:3"
        in err
    )
    warnings = [line for line in err if line.startswith("warning:")]
    assert warnings == [
        f"warning: 1 of 4 eval records also appear in the training data (1 exact, 0 near "
        f"duplicates), e.g. {ev}:2 = {tr}:5; the eval loss will look better than it is "
        f"(see `tuneforge data contamination {tr} {ev}`)"
    ]


def test_no_warning_and_no_notes_by_default(tmp_path):
    tr = write_jsonl(tmp_path / "t.jsonl", ROWS)
    notes = []
    conv = prepare_conversations(DataConfig(train=str(tr), eval_split=0.2), 0, log=notes.append)
    assert notes == [] and (len(conv.train), len(conv.eval)) == (8, 2)


def test_eval_split_straddling_duplicates_warns(tmp_path):
    tr = write_jsonl(tmp_path / "t.jsonl", ROWS + ROWS)  # every record twice
    notes = []
    conv = prepare_conversations(DataConfig(train=str(tr), eval_split=0.2), 0, log=notes.append)
    prompts = [c[0]["content"] for c in conv.eval]
    in_train = sum(1 for p in prompts if prompts.count(p) == 1)  # its twin stayed in train
    assert len(conv.eval) == 4 and len(notes) == 1 and in_train >= 1
    assert notes[0].startswith(
        f"warning: {in_train} of 4 eval records also appear in the training data "
        f"({in_train} exact, 0 near duplicates)"
    )
    assert notes[0].endswith(f"(remove duplicates with `tuneforge data dedup {tr}`)")


def test_augment_in_train_grows_train_only(tmp_path):
    tr = write_jsonl(tmp_path / "t.jsonl", ROWS)
    cfg = DataConfig(
        train=str(tr), eval_split=0.2, augment=3, augment_mode="noise", augment_noise=0.3
    )
    notes = []
    conv = prepare_conversations(cfg, 0, log=notes.append)
    added = len(conv.train) - 8
    assert len(conv.eval) == 2 and 12 <= added <= 16
    assert notes == [f"data.augment: added {added} variants of 8 records ({added} noise)"]
    assert all(s.endswith("(noise)") for s in conv.train_sources[8:])
    held = {c[0]["content"] for c in conv.eval}
    outputs = {c[1]["content"] for c in conv.eval}
    # variants keep their original's answer, so no held-out answer appears in train
    assert not outputs & {c[1]["content"] for c in conv.train}
    assert not held & {c[0]["content"] for c in conv.train}


def test_paraphrase_augment_needs_the_model(tmp_path):
    tr = write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(TuneforgeError, match="needs the model"):
        prepare_conversations(DataConfig(train=str(tr), augment=2), 0, log=lambda m: None)


def test_config_keys(tmp_path):
    base = ["model=tiny-llama", "output_dir=r", "data.train=t.jsonl"]
    cfg = load_config(None, [*base, "data.mix=g.jsonl:0.2", "data.dedup=true"])
    assert cfg.data.mix == [{"path": "g.jsonl", "ratio": 0.2}] and cfg.data.dedup
    cfg = load_config(None, [*base, "data.mix=[{path: g.jsonl, ratio: 0.3}, h.jsonl:0.1]"])
    assert cfg.data.mix == [{"path": "g.jsonl", "ratio": 0.3}, {"path": "h.jsonl", "ratio": 0.1}]
    with pytest.raises(TuneforgeError, match=r"'data.mix\[0\].ratio' must be a number in \(0, 1\)"):
        load_config(None, [*base, "data.mix=[{path: g.jsonl, ratio: 2}]"])
    with pytest.raises(TuneforgeError, match="'data.augment' must be 0 .off. or a factor"):
        load_config(None, [*base, "data.augment=1"])
    with pytest.raises(TuneforgeError, match="augment_mode' is 'words'; choose one of"):
        load_config(None, [*base, "data.augment_mode=words"])
