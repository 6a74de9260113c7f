"""Crash safety and numerical faults: kills at random moments (also mid-checkpoint), failing
writes, non-finite losses."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuneforge.errors import TuneforgeError
from tuneforge.train import train
from tuneforge.train.checkpoint import list_checkpoints, load_checkpoint

from ..conftest import ROOT, run_cli, tiny_config, write_jsonl
from ..fault_hooks.sitecustomize import poison_steps


def config_file(tmp_path, name, dates_rows, **training):
    train_f = write_jsonl(tmp_path / "train.jsonl", dates_rows[:32])
    cfg = {
        "model": "tiny-llama",
        "output_dir": str(tmp_path / name),
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "data": {"train": str(train_f), "max_length": 96},
        "training": {
            "max_steps": 10,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "save_steps": 2,
            "progress": False,
            "seed": 3,
            **training,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def adapter(tmp_path, name):
    return load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k


def test_kill_during_checkpoint_write_then_resume_is_bitwise_equal(tmp_path, dates_rows):
    clean = config_file(tmp_path, "clean", dates_rows)
    killed = config_file(tmp_path, "killed", dates_rows)
    assert run_cli("train", str(clean)).returncode == 0
    r = run_cli("train", str(killed), env={"TUNEFORGE_FAULT_KILL_IN_CHECKPOINT": "6"})
    assert r.returncode == -signal.SIGKILL
    root = tmp_path / "killed" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-2", "step-4"]
    assert (root / ".tmp-step-6").exists()  # the half-written one, never listed
    r = run_cli("train", str(killed), "--resume")
    assert r.returncode == 0, r.stderr
    assert not list(root.glob(".tmp-*"))
    assert_bitwise_equal(adapter(tmp_path, "clean"), adapter(tmp_path, "killed"))


@pytest.mark.slow
def test_ten_kills_at_random_moments(tmp_path, dates_rows):
    """SIGKILL from outside at 10 random moments (checkpoints every step, so many land inside a
    checkpoint write); after each kill the latest checkpoint loads; the end is bitwise equal.

    The kill moment is drawn within about one step interval measured on the running process, so
    the test makes exactly ten kills on a fast machine as on a slow one."""
    training = {"max_steps": 48, "save_steps": 1}
    clean = config_file(tmp_path, "clean", dates_rows, **training)
    killed = config_file(tmp_path, "killed", dates_rows, **training)
    assert run_cli("train", str(clean)).returncode == 0
    rng = random.Random(0)
    root = tmp_path / "killed" / "checkpoints"

    def latest_step():
        ckpts = list_checkpoints(root)  # old ones are pruned, so watch the step, not the count
        return int(ckpts[-1].name.split("-")[1]) if ckpts else 0

    def wait_for_progress(proc):
        before = latest_step()
        while proc.poll() is None and latest_step() <= before:
            time.sleep(0.005)

    kills = 0
    resume = []
    while kills < 10:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneforge", "train", str(killed), *resume],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_progress(proc)
        start = time.monotonic()
        wait_for_progress(proc)  # one full step, timed
        step_time = time.monotonic() - start
        time.sleep(rng.uniform(0, 1.5 * step_time))
        assert proc.poll() is None, "the run finished before ten kills; raise max_steps"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        resume = ["--resume"]
        ckpts = list_checkpoints(root)
        assert ckpts
        state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
        assert load_file(str(ckpts[-1] / "trainable.safetensors"))
        assert state["global_step"] == int(ckpts[-1].name.split("-")[1])
    r = run_cli("train", str(killed), "--resume")
    assert r.returncode == 0, r.stderr
    assert_bitwise_equal(adapter(tmp_path, "clean"), adapter(tmp_path, "killed"))


def test_failing_checkpoint_write_keeps_previous_checkpoint(tmp_path, dates_rows, monkeypatch):
    """Simulated full disk on the second checkpoint: a clear error, step-2 intact and loadable."""
    cfg = tiny_config(
        tmp_path,
        write_jsonl(tmp_path / "t.jsonl", dates_rows[:16]),
        **{"training.save_steps": 2, "training.max_steps": 6},
    )
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, path, *a, **k):
        if "step-4" in str(path):
            calls["n"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(TuneforgeError) as e:
        train(cfg)
    msg = str(e.value)
    assert "could not write checkpoint step-4" in msg and "No space left on device" in msg
    assert "the previous checkpoint step-2 is intact" in msg and calls["n"] == 1
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-2"]
    monkeypatch.setattr(torch, "save", real_save)
    from tuneforge.methods import apply_method
    from tuneforge.models import load_model
    from tuneforge.train.loop import build_optimizer

    model = apply_method(load_model("tiny-llama")[0], cfg.method)
    opt = build_optimizer(model, cfg.training)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state, _ = load_checkpoint(root / "step-2", model, opt, sched)
    assert state["global_step"] == 2


def test_nan_steps_are_skipped_and_counted(tmp_path, dates_rows, monkeypatch):
    cfg = tiny_config(
        tmp_path, write_jsonl(tmp_path / "t.jsonl", dates_rows[:16]), **{"training.max_steps": 6}
    )
    poison_steps(monkeypatch.setattr, {2, 3})
    summary = train(cfg)
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("skipped")] == [2, 3]
    for t in adapter(tmp_path, "run").values():
        assert torch.isfinite(t).all()


def test_divergence_stops_with_a_clear_message_and_keeps_the_good_checkpoint(tmp_path, dates_rows):
    cfg = config_file(
        tmp_path,
        "run",
        dates_rows,
        max_steps=30,
        save_steps=1,
        max_bad_steps=3,
        max_grad_norm=0,
        lr_scheduler="constant",
    )
    r = run_cli("train", str(cfg), env={"TUNEFORGE_FAULT_NAN_STEPS": "4,5,6"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert lines[-1].startswith("error: training diverged: 3 steps in a row (up to step 6)")
    assert "the last good checkpoint is" in lines[-1] and "step-3" in lines[-1]
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step-2",
        "step-3",
    ]


def test_pickle_only_model_folder_is_refused(tmp_path):
    from tuneforge.models import load_model, resolve_model

    folder = tmp_path / "m"
    folder.mkdir()
    src = resolve_model("tiny-llama")
    import shutil

    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{f}", folder / f)
    state = load_file(f"{src}/model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(TuneforgeError, match="only pickle weights"):
        load_model(str(folder))
