"""data.mix and data.split: ratios, determinism, stratification, augmented records kept out of eval."""

import json
from collections import Counter

import pytest

from tuneforge.config import DataConfig
from tuneforge.data.io import read_records
from tuneforge.data.pipeline import prepare_conversations
from tuneforge.data.split import split_file
from tuneforge.datatools.augment import AugmentOptions, augment_records
from tuneforge.datatools.mix import MixSource, mix_files, parse_mix_config, quotas
from tuneforge.errors import TuneforgeError

from ..conftest import write_jsonl


def rows(tag: str, n: int, **extra) -> list[dict]:
    return [{"instruction": f"{tag} task {i}", "output": f"{tag} {i}", **extra} for i in range(n)]


def read(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_quotas_add_up_by_largest_remainder():
    assert quotas(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert quotas(7, [1, 1, 1]) == [3, 2, 2]
    assert quotas(125, [0.8, 0.2]) == [100, 25]
    assert sum(quotas(1001, [0.37, 0.41, 0.22])) == 1001


def test_mix_hits_the_ratios_repeats_small_sources_and_is_deterministic(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows("A", 100))
    b = write_jsonl(tmp_path / "b.jsonl", rows("B", 50))
    srcs = [MixSource(str(a), 0.8), MixSource(str(b), 0.2)]
    rep = mix_files(srcs, tmp_path / "m.jsonl", total=200, seed=3)
    out = read(tmp_path / "m.jsonl")
    by_source = Counter(r["instruction"][0] for r in out)
    assert rep.total == 200 and by_source == {"A": 160, "B": 40}
    uses = Counter(r["instruction"] for r in out if r["instruction"][0] == "A")
    assert len(uses) == 100 and set(uses.values()) == {1, 2}  # every A once, 60 of them twice
    assert len({r["instruction"] for r in out if r["instruction"][0] == "B"}) == 40  # no repeats
    assert {r["instruction"][0] for r in out[:20]} == {"A", "B"}  # interleaved, not appended
    # the same seed gives the same bytes; another seed another draw
    mix_files(srcs, tmp_path / "m2.jsonl", total=200, seed=3)
    mix_files(srcs, tmp_path / "m3.jsonl", total=200, seed=4)
    assert (tmp_path / "m2.jsonl").read_bytes() == (tmp_path / "m.jsonl").read_bytes()
    assert (tmp_path / "m3.jsonl").read_bytes() != (tmp_path / "m.jsonl").read_bytes()


def test_mix_default_total_uses_no_record_twice(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows("A", 100))
    b = write_jsonl(tmp_path / "b.jsonl", rows("B", 50))
    rep = mix_files([MixSource(str(a), 0.8), MixSource(str(b), 0.2)], tmp_path / "m.jsonl")
    out = read(tmp_path / "m.jsonl")
    assert rep.total == 125 == len(out) == len({r["instruction"] for r in out})
    assert Counter(r["instruction"][0] for r in out) == {"A": 100, "B": 25}


def test_mix_formats(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows("A", 10))
    chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    c = write_jsonl(tmp_path / "c.jsonl", chat * 10)
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}] * 10)
    rep = mix_files([MixSource(str(a), 0.5), MixSource(str(c), 0.5)], tmp_path / "m.jsonl")
    assert rep.converted_to_chat and all("messages" in r for r in read(tmp_path / "m.jsonl"))
    with pytest.raises(TuneforgeError, match="cannot mix these formats"):
        mix_files([MixSource(str(a), 0.5), MixSource(str(t), 0.5)], tmp_path / "x.jsonl")
    with pytest.raises(TuneforgeError, match="add up to 0.9"):
        mix_files([MixSource(str(a), 0.5), MixSource(str(c), 0.4)], tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_mix_config_is_checked():
    assert parse_mix_config(["g.jsonl:0.2", {"path": "h.jsonl", "ratio": 0.1}]) == [
        {"path": "g.jsonl", "ratio": 0.2},
        {"path": "h.jsonl", "ratio": 0.1},
    ]
    with pytest.raises(TuneforgeError, match="sum below 1"):
        parse_mix_config([{"path": "g.jsonl", "ratio": 0.6}, {"path": "h.jsonl", "ratio": 0.5}])
    with pytest.raises(TuneforgeError, match=r"'data.mix\[0\]' has unknown key 'weight'"):
        parse_mix_config([{"path": "g.jsonl", "weight": 0.2}])


def test_train_mix_adds_the_other_source_at_its_share(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", rows("T", 40))
    general = write_jsonl(tmp_path / "g.jsonl", rows("G", 7))
    cfg = DataConfig(train=str(train), mix=parse_mix_config([f"{general}:0.2"]))
    conv = prepare_conversations(cfg, seed=1, log=lambda m: None)
    users = Counter(c[0]["content"][0] for c in conv.train)
    assert users == {"T": 40, "G": 10}  # 10 of 50 = 20%; the 7 general records repeated
    assert len(conv.notes) == 1 and conv.notes[0].startswith("data.mix: 50 training records")


def test_split_is_deterministic_and_matches_train_eval_split(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows("R", 50))
    rep, tr, ev = split_file(src, 0.1, seed=42)
    assert (rep.train, rep.eval) == (45, 5)
    first = ev.read_bytes()
    split_file(src, 0.1, seed=42)
    assert ev.read_bytes() == first
    split_file(src, 0.1, seed=7)
    assert ev.read_bytes() != first
    split_file(src, 0.1, seed=42)
    assert sorted(read(tr) + read(ev), key=lambda r: r["output"]) == sorted(
        rows("R", 50), key=lambda r: r["output"]
    )
    # train's data.eval_split holds out the same records for the same seed
    conv = prepare_conversations(
        DataConfig(train=str(src), eval_split=0.1), seed=42, log=lambda m: None
    )
    assert [c[0]["content"] for c in conv.eval] == [r["instruction"] for r in read(ev)]


def test_split_stratified_keeps_each_share(tmp_path):
    data = rows("a", 50, cat="a") + rows("b", 30, cat="b") + rows("c", 20, cat="c")
    src = write_jsonl(tmp_path / "d.jsonl", data)
    rep, _, ev = split_file(src, 0.1, seed=1, stratify="cat")
    assert Counter(r["cat"] for r in read(ev)) == {"a": 5, "b": 3, "c": 2}
    assert rep.strata == {"a": (50, 5), "b": (30, 3), "c": (20, 2)}
    src2 = write_jsonl(tmp_path / "e.jsonl", data + [{"instruction": "x", "output": "y"}])
    with pytest.raises(TuneforgeError, match=r"e.jsonl:101: 'cat' is missing"):
        split_file(src2, 0.1, stratify="cat")
    assert not (tmp_path / "e.train.jsonl").exists()


def test_augmented_records_never_reach_eval(tmp_path):
    originals = write_jsonl(tmp_path / "o.jsonl", rows("R", 40))
    opts = AugmentOptions(factor=3, mode="noise", noise=0.3, seed=0)
    augmented = list(augment_records(read_records(originals), opts))
    src = write_jsonl(tmp_path / "aug.jsonl", augmented)
    n_variants = sum(1 for r in augmented if r.get("augmented"))
    assert n_variants > 60
    rep, tr, ev = split_file(src, 0.25, seed=0)
    evals = read(ev)
    assert len(evals) == 10 and not any(r.get("augmented") for r in evals)
    held = {r["output"] for r in evals}
    train = read(tr)
    # variants of held-out originals are dropped; all others follow their original into train
    assert not any(r["output"] in held for r in train)
    expected_dropped = sum(1 for r in augmented if r.get("augmented") and r["output"] in held)
    assert rep.dropped_augmented == expected_dropped > 0
    assert rep.train == len(augmented) - 10 - expected_dropped
    # train's eval_split on the same file does the same
    conv = prepare_conversations(
        DataConfig(train=str(src), eval_split=0.25), seed=0, log=lambda m: None
    )
    augmented_lines = {f"{src}:{i + 1}" for i, r in enumerate(augmented) if r.get("augmented")}
    assert len(conv.eval) == 10 and not set(conv.eval_sources) & augmented_lines
    assert {c[1]["content"] for c in conv.eval} == held
