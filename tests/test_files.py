"""files.py: outputs appear whole or not at all."""

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_folder, atomic_path, write_atomic


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    write_atomic(target, "new text é")
    assert target.read_text(encoding="utf-8") == "new text é"
    write_atomic(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_folder_replaces_only_when_the_block_succeeds(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (out / "weights").read_text() == "old"  # the old folder untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left
    with atomic_folder(out) as tmp:
        (tmp / "weights").write_text("new")
        assert not (out / "weights").read_text() == "new"  # invisible until the block ends
    assert [p.name for p in out.iterdir()] == ["weights"]
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_path_refuses_a_folder_a_missing_parent_and_an_input(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("{}\n")
    for path, why in (
        (tmp_path, "is a folder"),
        (tmp_path / "nope" / "x.jsonl", "does not exist"),
        (data, "would replace an input"),
    ):
        with pytest.raises(TuneforgeError, match=why), atomic_path(path, inputs=(data,)):
            pass
    assert data.read_text() == "{}\n"
