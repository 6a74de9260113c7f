"""training.report_to: tensorboard writes event files with the same numbers as metrics.jsonl."""

import json
import sys

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.train import train

from ..conftest import tiny_config, write_jsonl


def test_tensorboard_events_match_metrics_jsonl(tmp_path, dates_rows):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_jsonl(tmp_path / "t.jsonl", dates_rows[:16])
    held = write_jsonl(tmp_path / "e.jsonl", dates_rows[16:20])
    cfg = tiny_config(
        tmp_path,
        data,
        held,
        **{
            "training.max_steps": 4,
            "training.eval_steps": 2,
            "training.report_to": "tensorboard",
        },
    )
    train(cfg)
    run = tmp_path / "run"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    eval_loss = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    tb_train = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    tb_eval = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    assert [s for s, _ in tb_train] == [1, 2, 3, 4] and [s for s, _ in tb_eval] == [2, 4]
    assert [v for _, v in tb_train] == pytest.approx([v for _, v in train_loss], rel=1e-5)
    assert [v for _, v in tb_eval] == pytest.approx([v for _, v in eval_loss], rel=1e-5)
    assert "train/learning_rate" in acc.Tags()["scalars"]


def test_report_to_tensorboard_without_the_package_fails_before_writing(
    tmp_path, dates_rows, monkeypatch
):
    """The missing package is simulated (None in sys.modules makes the import fail)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    data = write_jsonl(tmp_path / "t.jsonl", dates_rows[:8])
    cfg = tiny_config(tmp_path, data, **{"training.report_to": "tensorboard"})
    with pytest.raises(TuneforgeError, match=r"pip install 'tuneforge\[tensorboard\]'"):
        train(cfg)
    assert not (tmp_path / "run").exists()
