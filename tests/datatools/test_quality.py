"""data.quality, data.validate and data.stats: cleaning, duplicates, contamination, statistics."""

import json
import random

import numpy as np
import pytest

from tuneforge.data.io import Record
from tuneforge.datatools.quality import (
    DEFAULT_NGRAM,
    DEFAULT_THRESHOLD,
    CleanOptions,
    Deduper,
    DedupReport,
    clean_file,
    clean_text,
    dedup_file,
    dedup_records,
    find_contamination,
    jaccard,
    shingles,
)
from tuneforge.datatools.stats import compute_stats, plot_lengths
from tuneforge.datatools.validate import validate_file
from tuneforge.errors import TuneforgeError

from ..conftest import write_jsonl


def near_duplicate_pairs_bruteforce(
    texts: list[str], threshold: float = DEFAULT_THRESHOLD, ngram: int = DEFAULT_NGRAM
) -> set[tuple[int, int]]:
    """All pairs (i < j) whose exact shingle Jaccard reaches ``threshold``: the O(n²) reference
    the LSH path is tested against."""
    sets = [shingles(t, ngram) for t in texts]
    return {
        (i, j)
        for i in range(len(sets))
        for j in range(i + 1, len(sets))
        if jaccard(sets[i], sets[j]) >= threshold
    }


def random_texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def one_word_changed(text: str, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split()
    words[rng.randrange(1, len(words) - 1)] = f"edited{seed}"
    return " ".join(words)


def test_clean_text_normalises_unicode_whitespace_and_control_characters():
    raw = "  Cafe\u0301\u00a0bar\u200b\r\nline two \t\r\n\n\n\nend\x07\x1b "
    assert clean_text(raw) == "Café bar\nline two\n\nend"
    assert clean_text("keep\ttabs\n  and indents") == "keep\ttabs\n  and indents"


def test_clean_file_drops_with_reasons_and_counts(tmp_path):
    rows = [
        {"instruction": "Say hi", "output": "  hi\u00a0there  "},  # kept, changed
        {"instruction": "Say hi", "output": "hello"},  # kept as is
        {"instruction": "Empty", "output": "\u200b \x07 "},  # empty after cleaning
        {"instruction": "Short", "output": "ok"},  # shorter than 3 chars
        {"instruction": "Long " * 50, "output": "fine"},  # over 100 characters
        {"instruction": "No output"},  # unusable: missing output
        {"instruction": "Fine", "output": "yes"},  # kept
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    rep = clean_file(src, tmp_path / "out.jsonl", CleanOptions(min_output_chars=3, max_chars=100))
    assert (rep.records, rep.kept, rep.changed) == (7, 3, 1)
    assert dict(rep.dropped) == {"empty-output": 1, "short-output": 1, "too-long": 1, "unusable": 1}
    assert [(s.rsplit(":", 1)[1], r) for s, r, _ in rep.drops] == [
        ("3", "empty-output"),
        ("4", "short-output"),
        ("5", "too-long"),
        ("6", "unusable"),
    ]
    assert "'output'" in rep.drops[3][2] or "output" in rep.drops[3][2]
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["output"] for r in out] == ["hi there", "hello", "yes"]


def test_clean_every_record_dropped_is_an_error_and_writes_nothing(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "a", "output": " \x00 "}])
    with pytest.raises(TuneforgeError, match="every record was dropped"):
        clean_file(src, tmp_path / "out.jsonl", CleanOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_exact_duplicates_ignore_case_and_whitespace_and_keep_the_first(tmp_path):
    base = [{"instruction": f"Task {i}", "output": f"Answer {i}"} for i in range(10)]
    variants = [
        {"instruction": "TASK 3", "output": "answer  3"},
        {"instruction": "Task 3", "output": "Answer 3"},
        {"instruction": "task 7 ", "output": "Answer\n7"},
        {"instruction": "Task 7", "output": "Answer 8"},  # different: not a duplicate
    ]
    src = write_jsonl(tmp_path / "in.jsonl", base + variants)
    rep = dedup_file(src, tmp_path / "out.jsonl", near=False)
    assert (rep.records, rep.kept, rep.exact, rep.near) == (14, 11, 3, 0)
    assert {d.source.rsplit(":", 1)[1]: d.kept.rsplit(":", 1)[1] for d in rep.duplicates} == {
        "11": "4",
        "12": "4",
        "13": "8",
    }
    kept = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept == base + [variants[3]]


def test_near_duplicates_match_the_bruteforce_reference():
    """LSH (fast path) finds the same clusters as exact all-pairs Jaccard (plain path) on data
    where every pair is either clearly similar (>= 0.95) or clearly not (< 0.4)."""
    originals = random_texts(60, 80, seed=1)
    texts = list(originals)
    planted = {}
    for k, i in enumerate(range(0, 60, 4)):  # 15 near copies, one word changed
        planted[len(texts)] = i
        texts.append(one_word_changed(originals[i], k))
    # a few records sharing half their words with an original: Jaccard well below 0.85
    for k, i in enumerate((1, 5, 9)):
        half = originals[i].split()[:40] + random_texts(1, 40, seed=100 + k)[0].split()
        texts.append(" ".join(half))
    pairs = near_duplicate_pairs_bruteforce(texts)
    sims = {
        (i, j): jaccard(shingles(texts[i]), shingles(texts[j]))
        for i in range(len(texts))
        for j in range(i)
    }
    assert all(s >= 0.95 or s < 0.4 for s in sims.values())  # clear separation
    assert {(i, j) for i, j in pairs} == {(i, j) for j, i in planted.items()}

    expected = {}  # plain greedy clustering: first occurrence kept
    for j in range(len(texts)):
        reps = [i for i in range(j) if (i, j) in pairs and i not in expected]
        if reps:
            expected[j] = reps[0]
    report = DedupReport()
    records = [Record({"text": t}, f"f:{i}") for i, t in enumerate(texts)]
    kept = list(dedup_records(records, report))
    found = {int(d.source[2:]): int(d.kept[2:]) for d in report.duplicates}
    assert found == expected == planted
    assert report.near == 15 and report.exact == 0 and len(kept) == len(texts) - 15
    assert all(d.similarity >= 0.85 for d in report.duplicates)


def test_near_threshold_is_respected():
    a = " ".join(f"w{i}" for i in range(20))
    b = one_word_changed(a, 1)  # 19 bigrams, 2 differ: Jaccard 17/21 = 0.81
    assert jaccard(shingles(a), shingles(b)) == pytest.approx(17 / 21)
    strict, loose = Deduper(threshold=0.9), Deduper(threshold=0.6)
    assert strict.check(a, "a") is None and strict.check(b, "b") is None
    assert loose.check(a, "a") is None and loose.check(b, "b").kind == "near"


def test_contamination_finds_exact_and_near_eval_records():
    train_texts = random_texts(50, 60, seed=2)
    train = [(f"train:{i}", t) for i, t in enumerate(train_texts)]
    evals = [
        ("eval:1", train_texts[3].upper()),  # exact (case)
        ("eval:2", "  " + train_texts[10].replace(" ", "\n", 3)),  # exact (whitespace)
        ("eval:3", one_word_changed(train_texts[20], 1)),  # near
        ("eval:4", random_texts(1, 60, seed=9)[0]),  # clean
        ("eval:5", train_texts[44]),  # exact
        ("eval:6", one_word_changed(train_texts[7], 2)),  # near
    ] + [(f"eval:{7 + i}", t) for i, t in enumerate(random_texts(4, 60, seed=10))]
    n, found = find_contamination(train, evals)
    assert n == 10
    assert [(c.eval_source, c.train_source, c.kind) for c in found] == [
        ("eval:1", "train:3", "exact"),
        ("eval:2", "train:10", "exact"),
        ("eval:3", "train:20", "near"),
        ("eval:5", "train:44", "exact"),
        ("eval:6", "train:7", "near"),
    ]
    n, found = find_contamination(train, evals, near=False)
    assert [c.eval_source for c in found] == ["eval:1", "eval:2", "eval:5"]


def test_validate_lists_every_problem_with_line_field_and_kind(tmp_path):
    good = {"instruction": "a", "output": "b"}
    lines = [
        json.dumps(good),
        json.dumps({"instruction": "a"}),
        json.dumps({"instruction": ["x"], "output": ""}),
        json.dumps(good),
        json.dumps({"messages": [{"role": "user", "content": "x"}]}),
        '{"instruction": "a", ',
        json.dumps({"foo": 1}),
    ]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    report, problems = validate_file(p)
    got = [(x.source.rsplit(":", 1)[1], x.field, x.kind) for x in problems]
    assert got == [
        ("2", "output", "missing"),
        ("3", "instruction", "type"),
        ("3", "output", "empty"),
        ("4", "", "duplicate"),
        ("5", "", "mixed-format"),
        ("6", "", "json"),
        ("7", "", "unknown-layout"),
    ]
    assert report.format == "instruction"
    assert (report.records, report.unusable_records) == (7, 5)
    assert report.counts["duplicate"] == 1 and report.counts["missing"] == 1


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
            "preference",
        ),
        ({"text": "some text"}, "text"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "chat",
        ),
    ],
)
def test_validate_detects_each_format(tmp_path, row, fmt):
    report, problems = validate_file(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert report.format == fmt and problems == []


def test_validate_preference_problems(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {
            "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "chosen": "x",
            "rejected": "y",
        },
        {"prompt": "q", "chosen": "x"},
    ]
    _, problems = validate_file(write_jsonl(tmp_path / "p.jsonl", rows))
    got = [(x.source.rsplit(":", 1)[1], x.field, x.kind, x.unusable) for x in problems]
    assert got == [
        ("1", "rejected", "identical-replies", False),
        ("2", "prompt", "order", True),
        ("3", "rejected", "missing", True),
    ]


def test_stats_numbers(tmp_path, tokenizer):
    from tuneforge.data.records import to_messages
    from tuneforge.data.render import ensure_chat_template, render_dataset

    long_text = random_texts(1, 80, seed=3)[0]
    rows = [
        {"instruction": "a b c", "output": "one"},
        {"instruction": "A B c", "output": "one"},  # exact duplicate of 1 (case)
        {"instruction": "a b d", "output": long_text},
        {"instruction": "a b d", "output": one_word_changed(long_text, 1)},  # near copy of 3
        {"instruction": "x y", "output": "two " * 30},
        {"instruction": "z", "output": "three"},
    ]
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    ensure_chat_template(tokenizer)
    st = compute_stats(src, tokenizer, max_length=40)
    assert st.format == "instruction" and st.records == 6 and st.unusable == 0
    assert st.exact_duplicates == 1 and st.duplicate_rate == pytest.approx(1 / 6)
    assert st.clusters == 2 and st.near_duplicate_share == pytest.approx(4 / 6)
    # prompts: [a b c] [a b c] [a b d] [a b d] [x y] [z]: 15 words, 7 distinct (a b c d x y z)
    assert st.distinct_1 == pytest.approx(7 / 15)
    # bigrams: ab bc ab bc ab bd ab bd xy = 9, distinct ab bc bd xy = 4
    assert st.distinct_2 == pytest.approx(4 / 9)
    # token lengths are the ones train renders; "too long" is train's truncated count
    convs = [to_messages(Record(r, "s"), "auto") for r in rows]
    _, render_stats = render_dataset(tokenizer, convs, ["s"] * 6, 40)
    from tuneforge.data.render import render_messages

    lengths = [len(render_messages(tokenizer, c, 10**9)) for c in convs]
    assert st.lengths == lengths
    assert st.over_max_length == render_stats.truncated == sum(n > 40 for n in lengths) >= 1
    assert st.tokens["median"] == float(np.median(lengths)) and st.tokens["max"] == max(lengths)
    assert st.turns == {"min": 1, "median": 1.0, "max": 1}

    png = plot_lengths(st, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (400, 700)
