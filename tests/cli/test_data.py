"""`tuneforge data ...`: reports, exit status 2 with one line for bad input, nothing half-written."""

import json

import pytest

from tuneforge.cli import main

from ..conftest import run_cli, write_jsonl

GOOD = [{"instruction": f"Task number {i}", "output": f"Answer {i}"} for i in range(20)]


def cli(capsys, *args):
    rc = main(["data", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc, err) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_validate_lists_problems_then_counts_and_exits_2(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        "\n".join(
            [
                json.dumps(GOOD[0]),
                json.dumps({"instruction": "x"}),
                json.dumps({"instruction": "y", "output": "  "}),
                json.dumps(GOOD[0]),
                '{"instruction": "cut',
            ]
        )
    )
    r = run_cli("data", "validate", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {p}: 3 of 5 records are unusable (listed above)"
    lines = r.stdout.splitlines()
    assert lines[:4] == [
        f"{p}:2: output: is missing",
        f"{p}:3: output: is empty",
        f"{p}:4: warning: the same record as {p}:1",
        f"{p}:5: invalid JSON (Unterminated string starting at); the last line looks cut off "
        "(was the file truncated?)",
    ]
    assert lines[4] == f"{p}: 5 records, format: instruction"
    counts = {ln.split()[0]: (int(ln.split()[1]), ln.split()[2]) for ln in lines[6:]}
    assert counts == {
        "duplicate": (1, "warning"),
        "empty": (1, "unusable"),
        "json": (1, "unusable"),
        "missing": (1, "unusable"),
    }


def test_validate_passes_a_good_file(tmp_path, capsys):
    rc, out, _ = cli(capsys, "validate", write_jsonl(tmp_path / "g.jsonl", GOOD))
    assert rc == 0 and out.splitlines()[-1] == "all 20 records are usable"


def huge_line(path):
    path.write_text('{"text": "' + "a" * (16 * 2**20 + 10) + '"}\n{"text": "b"}\n')


BAD = {
    "encoding": (
        lambda p: p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
        ":2: not valid UTF-8",
    ),
    "truncated": (
        lambda p: p.write_text('{"text": "ok"}\n{"text": "cut'),
        ":2: invalid JSON (Unterminated string starting at); the last line looks cut off",
    ),
    "huge": (huge_line, ":1: a line longer than 16 MiB"),
    "mixed": (
        lambda p: p.write_text('{"text": "ok"}\n{"instruction": "a", "output": "b"}\n'),
        ":2: an instruction record in a file of text records",
    ),
    "empty": (lambda p: p.write_text("\n\n"), ": no records (the file is empty)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["clean", "dedup"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, command):
    make, message = BAD[case]
    src = tmp_path / "in.jsonl"
    make(src)
    rc, _, err = cli(capsys, command, src, "-o", tmp_path / "out.jsonl")
    assert one_error_line(rc, err).startswith(f"error: {src}{message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_every_writing_command_refuses_bad_input_without_output(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"ins'
    )
    out = tmp_path / "out.jsonl"
    for args in (
        ["convert", src, "--to", "chat", "-o", out],
        ["mix", f"{src}:1", "-o", out],
        ["split", src, "--eval", "0.5"],
        ["augment", src, "-o", out, "--factor", "2", "--mode", "noise"],
        ["stats", src, "--no-tokens"],
        ["contamination", src, src],
    ):
        rc, _, err = cli(capsys, *args)
        assert ":3: invalid JSON" in one_error_line(rc, err), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_output_names_are_checked_before_work(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    rc, _, err = cli(capsys, "clean", src, "-o", src)
    assert "the output would replace an input" in one_error_line(rc, err)
    rc, _, err = cli(capsys, "clean", src, "-o", tmp_path / "out.csv")
    assert "outputs are JSONL" in one_error_line(rc, err)
    rc, _, err = cli(capsys, "dedup", src, "-o", tmp_path / "nope" / "o.jsonl")
    assert "does not exist" in one_error_line(rc, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_dedup_and_contamination_reports(tmp_path, capsys):
    long = " ".join(f"w{i}" for i in range(60))
    rows = GOOD + [
        GOOD[3],
        {"instruction": "TASK NUMBER 3", "output": "answer 3"},
        {"instruction": long, "output": "x"},
        {"instruction": long.replace("w30", "changed"), "output": "x"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    rc, out, _ = cli(
        capsys, "dedup", src, "-o", tmp_path / "o.jsonl", "--report", tmp_path / "r.json"
    )
    assert rc == 0
    assert out.splitlines()[0] == (
        f"{src}: kept 21 of 24 records; removed 2 exact and 1 near duplicates "
        "(Jaccard >= 0.85 on word 2-grams) in 2 clusters"
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(c["kept"], [d["source"] for d in c["removed"]]) for c in report["clusters"]] == [
        (f"{src}:4", [f"{src}:21", f"{src}:22"]),
        (f"{src}:23", [f"{src}:24"]),
    ]
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 21

    ev = write_jsonl(tmp_path / "ev.jsonl", [GOOD[5], {"instruction": "new", "output": "y"}])
    rc, out, _ = cli(capsys, "contamination", src, ev)
    assert rc == 0 and out.splitlines() == [
        f"{ev}: 1 of 2 eval records (50.0%) appear in {src}: 1 exact, 0 near (Jaccard >= 0.85)",
        f"  {ev}:1 = {src}:6",
    ]


def test_mix_split_convert_stats_augment_commands(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", GOOD)
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "b", "output": "c"}] * 5)
    rc, out, _ = cli(
        capsys, "mix", f"{a}:0.75", f"{b}:0.25", "-o", tmp_path / "m.jsonl", "--total", 40
    )
    assert rc == 0 and f"{a}: 30 records (75.0%, asked 75.0%) from 20" in out
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 40

    rc, out, _ = cli(capsys, "split", a, "--eval", 0.25, "--seed", 1)
    assert rc == 0 and out.startswith(
        f"{a}: 15 train records -> {tmp_path / 'a.train.jsonl'}, 5 eval"
    )

    rc, _, _ = cli(capsys, "convert", a, "--to", "chat", "-o", tmp_path / "c.jsonl")
    rc2, _, _ = cli(
        capsys, "convert", tmp_path / "c.jsonl", "--to", "instruction", "-o", tmp_path / "i.jsonl"
    )
    assert rc == rc2 == 0 and (tmp_path / "i.jsonl").read_text() == a.read_text()

    rc, out, _ = cli(capsys, "stats", a, "--no-tokens", "--json")
    st = json.loads(out)
    assert rc == 0 and st["records"] == 20 and st["exact_duplicates"] == 0
    assert st["distinct_1"] == pytest.approx(22 / 60)  # task, number + 20 numbers of 60 words

    rc, out, _ = cli(
        capsys, "augment", a, "-o", tmp_path / "aug.jsonl", "--factor", 3, "--mode", "noise"
    )
    aug = [json.loads(x) for x in (tmp_path / "aug.jsonl").read_text().splitlines()]
    assert rc == 0 and len(aug) == 20 + sum(1 for r in aug if r.get("augmented"))
    assert sum(1 for r in aug if r.get("augmented")) >= 30


def test_help(capsys):
    for cmd in (
        "validate",
        "stats",
        "clean",
        "dedup",
        "contamination",
        "mix",
        "split",
        "augment",
        "convert",
    ):
        with pytest.raises(SystemExit) as e:
            main(["data", cmd, "--help"])
        assert e.value.code == 0 and f"usage: tuneforge data {cmd}" in capsys.readouterr().out
