"""The bad-input corpus (tests/bad_inputs, made by make_corpus.py): every malformed data or config
file ends with exit status 2 and one line naming what and where, no traceback, no output folder."""

import shutil
from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.fixture(scope="module")
def corpus_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("corpus") / "bad_inputs"
    shutil.copytree(CORPUS, dst)
    return dst


def run_case(args, where, monkeypatch, capsys):
    monkeypatch.chdir(where)
    code = main(list(args))  # any exception other than a user error propagates and fails here
    out = capsys.readouterr()
    return code, out


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, corpus_copy, monkeypatch, capsys):
    code, out = run_case(case["args"], corpus_copy, monkeypatch, capsys)
    lines = out.err.strip().splitlines()
    assert code == 2, out.err
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert case["expect"] in lines[0]
    assert "Traceback" not in out.err and out.out == ""
    assert not (corpus_copy / "out").exists()


def test_one_line_also_when_the_model_cache_is_empty(corpus_copy, tmp_path, monkeypatch, capsys):
    """The first run on a machine fills the model cache before it reads the data: that writes no
    progress bar, so a bad input still prints one line (a fresh CI clone once printed three)."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    case = next(c for c in CASES if c["name"] == "data_file_missing")
    code, out = run_case(case["args"], corpus_copy, monkeypatch, capsys)
    assert (tmp_path / "cache" / "models").is_dir()  # the cache was filled in this run
    assert code == 2 and out.err.strip().splitlines() == [out.err.strip()], out.err
    assert case["expect"] in out.err


def test_giant_line(tmp_path, monkeypatch, capsys):
    """A 20 MB line of garbage: reported by line number, not loaded into a traceback."""
    data = tmp_path / "giant.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n' + b"x" * 20_000_000 + b"\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: tiny-llama\noutput_dir: {tmp_path / 'out'}\ndata:\n  train: {data}\n")
    code, out = run_case(["train", str(cfg)], tmp_path, monkeypatch, capsys)
    assert (
        code == 2
        and out.err.strip() == f"error: {data}:2: invalid JSON (Expecting value) (a 20.0 MB line)"
    )
    assert not (tmp_path / "out").exists()
