"""The CLI: one-line errors with exit status 2 and nothing written; --help; generate."""

import json

import pytest

from ..conftest import run_cli, write_jsonl

CONFIG = """model: tiny-llama
output_dir: {out}
method:
  name: lora
  r: 4
data:
  train: {train}
  max_length: 96
training:
  max_steps: 2
  batch_size: 2
  progress: false
"""


def one_line_error(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture
def good(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"instruction": f"Say {i}", "output": str(i)} for i in range(8)]
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path / "run", train=train))
    return cfg, train


def test_bad_record_exits_2_with_file_line_field_and_writes_nothing(tmp_path, good):
    cfg, train = good
    lines = train.read_text().splitlines()
    lines[4] = json.dumps({"instruction": "x"})
    train.write_text("\n".join(lines) + "\n")
    err = one_line_error(run_cli("train", str(cfg)))
    assert (
        err
        == f"error: {train}:5: 'output' is missing (instruction records need 'instruction' and 'output')"
    )
    assert not (tmp_path / "run").exists()


def test_bad_config_key_exits_2_with_suggestion(tmp_path, good):
    cfg, _ = good
    original = cfg.read_text()
    cfg.write_text(original.replace("  max_steps: 2", "  learnin_rate: 2"))
    err = one_line_error(run_cli("train", str(cfg)))
    assert (
        err
        == f"error: {cfg}:10: unknown key 'learnin_rate' in training; did you mean 'learning_rate'?"
    )
    cfg.write_text(original)
    err = one_line_error(run_cli("train", str(cfg), "training.batch_sise=2"))
    assert "did you mean 'batch_size'?" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model=does/not/exist/here", "model 'does/not/exist/here': no such folder or file"),
        (
            "method.target_modules=[nope_proj]",
            "matches no layer of this model; its linear layers are",
        ),
        ("data.train=missing.jsonl", "missing.jsonl: data file not found"),
        (
            "data.max_length=8",
            "no training sample keeps a supervised token within data.max_length=8",
        ),
        ("training.learning_rate=-1", "'training.learning_rate' must be positive"),
    ],
)
def test_user_mistakes_are_one_line(tmp_path, good, override, expected):
    cfg, _ = good
    err = one_line_error(run_cli("train", str(cfg), override))
    assert expected in err
    assert not (tmp_path / "run").exists()


def test_help_for_each_command():
    for cmd in ("train", "generate", "merge"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "usage: tuneforge " + cmd in r.stdout


def test_train_then_generate_and_merge(tmp_path, good):
    cfg, _ = good
    r = run_cli("train", str(cfg), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "trainable parameters:" in r.stderr
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "config.yaml").is_file()
    r = run_cli("generate", str(run), "--prompt", "Say 3", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    r2 = run_cli("generate", str(run), "--prompt", "Say 3", "--max-new-tokens", "5")
    assert r.stdout == r2.stdout  # greedy is deterministic
    r = run_cli("merge", str(run), "--out", str(tmp_path / "merged"))
    assert r.returncode == 0 and (tmp_path / "merged" / "config.json").is_file()
    err = one_line_error(run_cli("merge", str(run), "--out", str(tmp_path / "merged")))
    assert "already exists; pass --overwrite" in err
    err = one_line_error(run_cli("generate", str(tmp_path / "nothing"), "--prompt", "x"))
    assert "no such folder or file" in err
