"""Config: typed keys, overrides, and errors that name the key (with a suggestion)."""

from pathlib import Path

import pytest

from tuneforge.config import config_reference, load_config, parse_overrides
from tuneforge.errors import TuneforgeError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert cfg.model and cfg.output_dir and Path(ROOT / cfg.data.train).is_file()


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "model: tiny-llama\noutput_dir: out\ndata:\n  train: t.jsonl\n"


def test_unknown_key_names_line_and_suggests(tmp_path):
    p = write(tmp_path, BASE + "training:\n  learnin_rate: 1e-4\n")
    with pytest.raises(TuneforgeError) as e:
        load_config(p)
    assert str(e.value) == (
        f"{p}:6: unknown key 'learnin_rate' in training; did you mean 'learning_rate'?"
    )


def test_wrong_type_and_bad_values(tmp_path):
    with pytest.raises(TuneforgeError, match=r"c.yaml:6: 'training.batch_size' must be an integer"):
        load_config(write(tmp_path, BASE + "training:\n  batch_size: four\n"))
    with pytest.raises(TuneforgeError, match="'training.learning_rate' must be positive"):
        load_config(write(tmp_path, BASE + "training:\n  learning_rate: -1\n"))
    with pytest.raises(TuneforgeError, match="'method.r' must be at least 1"):
        load_config(write(tmp_path, BASE + "method:\n  name: lora\n  r: 0\n"))
    with pytest.raises(TuneforgeError, match="'method.name' is 'lorra'; choose one of"):
        load_config(write(tmp_path, BASE + "method: lorra\n"))
    with pytest.raises(TuneforgeError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(write(tmp_path, "model: [\noutput_dir: x\n"))


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        ["training.learning_rate=1e-4", "method.target_modules=[q_proj,v_proj]", "method.r=8"],
    )
    assert cfg.training.learning_rate == 1e-4
    assert cfg.method.target_modules == ["q_proj", "v_proj"] and cfg.method.r == 8
    with pytest.raises(TuneforgeError, match="unknown key 'lr' in training"):
        load_config(write(tmp_path, BASE), ["training.lr=1"])
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_reference_lists_every_key():
    ref = config_reference()
    for key in ("training.learning_rate", "method.lora_alpha", "data.max_length", "output_dir"):
        assert f"`{key}`" in ref
