"""Shared fixtures. Fast tests use tiny random models of real architectures with the real
SmolLM2 tokenizer; tests marked ``slow`` use the real built-in model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# `make test` runs two pytest workers (pytest-xdist): one thread each, and the same for the
# tuneforge processes the tests start, so 2 cores hold 2 threads (spinning OpenMP threads under
# oversubscription are much slower). A single pytest process takes 2 threads on the 2-core machine.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(
    int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, min(2, os.cpu_count() or 1))
)


@pytest.fixture(scope="session")
def builtin_path() -> Path:
    from tuneforge.models import builtin_path as bp

    return bp()


@pytest.fixture(scope="session")
def tokenizer(builtin_path):
    from tuneforge.models import load_tokenizer

    return load_tokenizer(str(builtin_path))


@pytest.fixture(params=["kernels", "torch"])
def kernel_path(request):
    """A test twice: with the fused CPU kernels (tuneforge.accel.kernels) and with the PyTorch path."""
    from tuneforge.accel import kernels

    if request.param == "torch":
        with kernels.disabled():
            yield request.param
        return
    if not kernels.available():
        pytest.skip("no C++ compiler here: the fused CPU kernels are not built")
    yield request.param


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def dates_rows() -> list[dict]:
    return [json.loads(x) for x in (ROOT / "examples/dates/train.jsonl").read_text().splitlines()]


def tiny_config(tmp_path: Path, train: Path, eval: Path | None = None, **overrides) -> object:
    """A Config for the tiny Llama, small and fast; overrides as dotted keys."""
    from tuneforge.config import load_config

    base = {
        "model": "tiny-llama",
        "output_dir": str(tmp_path / "run"),
        "data.train": str(train),
        "data.max_length": 128,
        "training.progress": False,
        "training.learning_rate": 1e-3,
        "training.batch_size": 4,
        "training.max_steps": 6,
        "method.name": "lora",
        "method.r": 4,
        "method.lora_alpha": 8,
        "method.lora_dropout": 0.0,
    }
    if eval is not None:
        base["data.eval"] = str(eval)
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def train_and_read_metrics(tmp_path: Path, data: Path, name: str, **overrides) -> tuple:
    """``train`` a tiny_config run into ``tmp_path / name``; returns (summary, metrics.jsonl rows)."""
    from tuneforge.train import train

    out = tmp_path / name
    summary = train(tiny_config(tmp_path, data, **{"output_dir": str(out), **overrides}))
    return summary, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def run_cli(
    *args: str, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    if any(k.startswith("TUNEFORGE_FAULT_") for k in env):  # tests/fault_hooks patches the run
        hooks = str(ROOT / "tests" / "fault_hooks")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (hooks, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "tuneforge", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=600,
    )


def train_tiny_run(tmp_path, name: str, word: str, seed: int = 0):
    """A tiny-llama LoRA run trained hard for a few steps, so its greedy replies differ from the
    base model's."""
    from tuneforge.train import train

    rows = [{"instruction": f"Say {i}", "output": f"{word} {i} {word}"} for i in range(16)]
    train_file = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    cfg = tiny_config(
        tmp_path,
        train_file,
        **{
            "output_dir": str(tmp_path / name),
            "training.max_steps": 3,
            "training.learning_rate": 5e-2,
            "training.seed": seed,
        },
    )
    train(cfg)
    return tmp_path / name


@pytest.fixture(scope="session")
def tiny_lora_runs(tmp_path_factory):
    """Two LoRA runs on tiny-llama (test_chat, test_serve)."""
    tmp = tmp_path_factory.mktemp("chat")
    return train_tiny_run(tmp, "run-a", "apple"), train_tiny_run(tmp, "run-b", "zebra", seed=1)


def assert_same_lora_update(a: dict, b: dict, rtol: float = 1e-4) -> None:
    """Two LoRA adapters (safetensors dicts) trained from the same start agree within ``rtol``
    of the update; lora_B starts at zero, so its norm is the size of the update (which must be
    visible, or the comparison would say nothing)."""
    update = max(float(v.norm()) for k, v in a.items() if "lora_B" in k)
    assert update > 1e-4, "no update to compare"
    assert a.keys() == b.keys()
    for k in a:
        assert float((b[k] - a[k]).norm()) <= rtol * update, k
