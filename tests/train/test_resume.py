"""A run killed with SIGKILL and resumed ends bitwise equal to a run never interrupted."""

import json

import pytest
import yaml
from safetensors.torch import load_file

from ..conftest import run_cli, write_jsonl


def write_config(tmp_path, name, method, dates_rows):
    train = write_jsonl(tmp_path / "train.jsonl", dates_rows[:40])
    evalf = write_jsonl(tmp_path / "eval.jsonl", dates_rows[40:48])
    cfg = {
        "model": "tiny-llama",
        "output_dir": str(tmp_path / name),
        "method": {
            "name": method,
            "r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.1,
        },  # dropout uses the RNG
        "data": {"train": str(train), "eval": str(evalf), "max_length": 96},
        "training": {
            "max_steps": 12,
            "batch_size": 4,
            "gradient_accumulation": 2,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.2,
            "eval_steps": 3,
            "save_steps": 3,
            "progress": False,
            "seed": 7,
        },
    }
    if method == "full":
        cfg["method"] = {"name": "full"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_sigkill_then_resume_is_bitwise_equal(tmp_path, dates_rows, method):
    clean = write_config(tmp_path, "clean", method, dates_rows)
    killed = write_config(tmp_path, "killed", method, dates_rows)
    r = run_cli("train", str(clean))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", str(killed), env={"TUNEFORGE_FAULT_KILL_AT_STEP": "8"})
    assert r.returncode == -9, r.stderr  # really killed by SIGKILL
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert ckpts == ["step-3", "step-6"]  # nothing half-written, nothing final
    assert (
        not (tmp_path / "killed" / "adapter").exists()
        and not (tmp_path / "killed" / "model").exists()
    )
    r = run_cli("train", str(killed), "--resume")
    assert r.returncode == 0, r.stderr
    weights = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    a = load_file(str(tmp_path / "clean" / weights))
    b = load_file(str(tmp_path / "killed" / weights))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k

    def metrics(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]

    assert metrics("clean") == metrics("killed")


def test_existing_output_is_never_overwritten(tmp_path, dates_rows):
    cfg = write_config(tmp_path, "run", "lora", dates_rows)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    r = run_cli("train", str(cfg), "training.max_steps=1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: output_dir '{tmp_path / 'run'}' already exists; pass --overwrite to replace it or --resume to continue it"
    ]
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"
    r = run_cli("train", str(cfg), "--resume")
    assert r.returncode == 2 and "no checkpoint to resume from" in r.stderr


def test_resume_keeps_the_best_weights_when_the_checkpoint_step_was_the_best(
    tmp_path, dates_rows, monkeypatch
):
    """Step 6's checkpoint holds the best eval loss (so no separate best file). The run stops right
    after writing it; on resume the later evals are worse, and the run must end on step 6's
    weights. Eval losses are scripted (a stand-in for a model that starts to overfit)."""
    from tuneforge.config import load_config
    from tuneforge.train import loop, train

    scripted = [2.0, 1.0, 1.5, 1.8]  # eval losses at steps 3, 6, 9, 12
    monkeypatch.setattr(loop.Trainer, "evaluate", lambda self: scripted.pop(0))

    class Crash(Exception):
        pass

    real_save = loop.save_checkpoint

    def save_then_crash(*args, **kwargs):
        out = real_save(*args, **kwargs)
        if args[1] == 6:
            raise Crash
        return out

    path = write_config(tmp_path, "run", "lora", dates_rows)
    cfg = load_config(str(path))
    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    step6 = load_file(str(tmp_path / "run" / "checkpoints" / "step-6" / "trainable.safetensors"))
    assert not (tmp_path / "run" / "checkpoints" / "step-6" / "best.safetensors").exists()
    train(cfg, resume=True)
    final = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert len(final) == len(step6)
    for a, b in zip(sorted(final.items()), sorted(step6.items()), strict=True):
        assert a[1].equal(b[1]), (a[0], b[0])
